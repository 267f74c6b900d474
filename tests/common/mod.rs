//! What the process-level tests share: the key, starting `ordermesh dev` on a free port,
//! minting tokens with the real `ordermesh token`, and (`cluster`) running `ordermesh node`
//! processes.
// Each test binary uses only part of this module.
#![allow(dead_code, clippy::unwrap_used)]

pub mod cluster;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The HS256 secret every process of a test is given (`ORDERMESH_JWT_SECRET`).
pub const SECRET: &str = "process-test-secret-that-is-long-enough-0123456789";

/// A running `ordermesh dev`; killed when dropped, so a failed assertion leaves no server
/// behind holding the test's pipes.
pub struct Dev {
    pub child: Child,
    pub base: String,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `ordermesh dev` on a free port with `env` set, and waits for its banner.
pub fn start_dev(data_dir: &Path, env: &[(&str, &str)]) -> Dev {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ordermesh"))
        .args(["dev", "--http", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("ORDERMESH_JWT_SECRET", SECRET)
        .env("ORDERMESH_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let base = loop {
        let line = lines.next().expect("dev exited before printing its address").unwrap();
        if let Some(url) = line.trim().strip_prefix("listening on ") {
            break url.to_owned();
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Dev { child, base }
}

/// The `ordermesh` binary cargo built for this test.
pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ordermesh"))
}

/// A token from `ordermesh token`, signed with [`SECRET`].
pub fn token(sub: &str, role: &str) -> String {
    cluster::mint_token(bin(), sub, role).unwrap()
}
