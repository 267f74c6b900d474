//! `ordermesh healthcheck`: a tiny HTTP/1.1 client, so images need no curl or shell.

use crate::HealthcheckFlags;
use anyhow::Context;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

pub fn run(config_file: Option<&Path>, flags: HealthcheckFlags) -> anyhow::Result<ExitCode> {
    let config = crate::wiring::load_config(config_file, flags)?;
    let addr = config.http;
    let timeout = Duration::from_secs(3);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.take(64 * 1024).read_to_string(&mut response)?;
    let status = response.split_whitespace().nth(1).unwrap_or("");
    if status == "200" {
        println!("ready");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("not ready: /readyz answered {}", if status.is_empty() { "nothing" } else { status });
        Ok(ExitCode::FAILURE)
    }
}
