//! The HTTP/1.1 client of the requests the bench sends by the thousand (`POST /v1/orders` and
//! the batched waits): hyper's connection API over kept-alive connections to each gateway.
//!
//! Why not reqwest here (it still seeds, checks the target and does the per-order polls): the
//! generator runs on the machine it measures, so every microsecond it spends is taken from the
//! server. Under reqwest it took about 0.04 ms of CPU per order, a sixth of the two cores at
//! 8,000 orders/s, much of it in layers a load generator does not need (a pooled client keyed
//! by origin, a retry policy, a timer and a URL conversion per request).

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use reqwest::Url;
use tokio::net::TcpStream;

/// A gateway's answer: its status and whole body.
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

/// No answer: the connection failed or closed, or the request timed out.
#[derive(Debug)]
pub struct NoAnswer;

/// Connections to one gateway, each used by one request at a time and kept for the next.
pub struct Gateway {
    /// `host:port`, to connect to.
    address: String,
    /// The `Host` header.
    host: HeaderValue,
    /// The base URL's path, without its trailing slash (`""` for a gateway at the root).
    base_path: String,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    timeout: Duration,
}

impl Gateway {
    /// A gateway at `target` (plain HTTP); each request gets at most `timeout` for its answer.
    pub fn new(target: &Url, timeout: Duration) -> anyhow::Result<Gateway> {
        // (An IPv6 host comes in brackets, as both uses need it.)
        let host = target.host_str().context("the target URL has no host")?;
        let port = target.port_or_known_default().context("the target URL has no port")?;
        Ok(Gateway {
            address: format!("{host}:{port}"),
            host: HeaderValue::from_str(&format!("{host}:{port}"))
                .context("the target's host is not a header value")?,
            base_path: target.path().trim_end_matches('/').to_owned(),
            idle: Mutex::new(Vec::new()),
            timeout,
        })
    }

    /// `POST <base>/<path>` with a JSON body, as `token` (a `Bearer ...` value).
    pub async fn post_json(&self, path: &str, token: &HeaderValue, body: Bytes) -> Result<Answer, NoAnswer> {
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/{path}", self.base_path))
            .header(HOST, self.host.clone())
            .header(AUTHORIZATION, token.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(Full::new(body))
            .map_err(|_| NoAnswer)?;
        self.send(request).await
    }

    /// Sends on an idle connection (or a new one) and reads the whole answer; the connection
    /// is kept only if the exchange completed. A kept connection the server has closed meanwhile
    /// (found out only now) costs a retry on a new one, as a pooled client would do, not an error.
    async fn send(&self, mut request: Request<Full<Bytes>>) -> Result<Answer, NoAnswer> {
        let exchange = async {
            loop {
                let (mut connection, kept) = self.connection().await?;
                if connection.ready().await.is_err() {
                    if kept {
                        continue;
                    }
                    return Err(NoAnswer);
                }
                let response = match connection.try_send_request(request).await {
                    Ok(response) => response,
                    Err(mut failed) => match failed.take_message() {
                        Some(unsent) if kept => {
                            request = unsent;
                            continue;
                        }
                        _ => return Err(NoAnswer),
                    },
                };
                let status = response.status();
                let body = response.into_body().collect().await.map_err(|_| NoAnswer)?.to_bytes();
                self.idle.lock().unwrap_or_else(PoisonError::into_inner).push(connection);
                return Ok(Answer { status, body });
            }
        };
        tokio::time::timeout(self.timeout, exchange).await.map_err(|_| NoAnswer)?
    }

    /// An idle connection that is still open (true: a kept one), or a new one.
    async fn connection(&self) -> Result<(SendRequest<Full<Bytes>>, bool), NoAnswer> {
        loop {
            let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
            match idle {
                Some(connection) if !connection.is_closed() => return Ok((connection, true)),
                Some(_closed) => continue,
                None => break,
            }
        }
        let stream = TcpStream::connect(&self.address).await.map_err(|_| NoAnswer)?;
        // Requests are small and written at once; Nagle would only delay them.
        stream.set_nodelay(true).map_err(|_| NoAnswer)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.map_err(|_| NoAnswer)?;
        // Drives the connection until the sender is dropped or the server closes it.
        tokio::spawn(connection);
        Ok((sender, false))
    }
}
