//! What crosses the network between nodes, and the remotable actor that receives it.
//!
//! ractor_cluster matches remote messages by variant name and silently drops what it cannot
//! decode, so there is exactly one remotable message type, [`WireMsg`], with one variant: an
//! RPC carrying opaque bytes. Those bytes are a [`WireRequest`] encoded by the storage codec
//! (a format header, then bincode) with our own protocol version inside, and the answer is a
//! codec-encoded [`WireReply`]. Anything that does not decode, or carries an unknown
//! version, is answered with an error reply; nothing a peer sends can panic a node.

use ordermesh_storage::codec;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Version of the envelope and of every service payload in it. A node answers a request of
/// another version with [`WireError::UnsupportedVersion`].
/// 2: heartbeats carry the shard count.
/// 3: payments follow the order placement (`ownership.rs`): nodes of version 2 would look for
/// a payment elsewhere, so they must not join (their heartbeats are refused); and the order
/// service's batched wait (`OrderRequest::WaitAnyTerminal`).
pub const WIRE_VERSION: u16 = 3;

/// The one remotable message: an RPC of codec-encoded bytes.
#[derive(RactorClusterMessage)]
pub enum WireMsg {
    #[rpc]
    Call(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

/// A request to one service's router on another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRequest {
    pub version: u16,
    /// The service the caller means (checked against the endpoint's).
    pub service: String,
    /// The service's own codec-encoded request.
    pub body: Vec<u8>,
}

/// The answer to a [`WireRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireReply {
    /// The service's codec-encoded response.
    Ok(Vec<u8>),
    Err(WireError),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum WireError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("unsupported wire version {0} (this node speaks {WIRE_VERSION})")]
    UnsupportedVersion(u16),
    #[error("request for {asked} sent to the {serving} endpoint")]
    WrongService { asked: String, serving: String },
    #[error("too many requests in flight")]
    Busy,
    #[error("{0}")]
    Handler(String),
}

/// A boxed future, as the handler trait returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a service exposes to other nodes: codec-encoded request in, codec-encoded response out.
/// Implemented by the services (they know their request types; the runtime does not).
pub trait WireHandler: Send + Sync + 'static {
    fn handle(self: Arc<Self>, body: Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>>;
}

/// Encodes a reply (an encoding failure becomes an empty vector, which the caller reports as
/// malformed: a reply is never silently lost).
pub(crate) fn encode_reply(reply: &WireReply) -> Vec<u8> {
    codec::encode(reply).unwrap_or_default()
}

/// Decodes and checks a request, runs it, encodes the answer. Never panics on any input.
pub async fn serve_bytes(service: &str, handler: Arc<dyn WireHandler>, bytes: &[u8]) -> Vec<u8> {
    let request = match codec::decode::<WireRequest>(bytes) {
        Ok(request) => request,
        Err(err) => return encode_reply(&WireReply::Err(WireError::Malformed(err.to_string()))),
    };
    if request.version != WIRE_VERSION {
        return encode_reply(&WireReply::Err(WireError::UnsupportedVersion(request.version)));
    }
    if request.service != service {
        return encode_reply(&WireReply::Err(WireError::WrongService {
            asked: request.service,
            serving: service.to_owned(),
        }));
    }
    match handler.handle(request.body).await {
        Ok(body) => encode_reply(&WireReply::Ok(body)),
        Err(err) => encode_reply(&WireReply::Err(WireError::Handler(err))),
    }
}

/// The remotable router of one service on this node. It never awaits a request itself: each
/// runs in its own task, at most `max_in_flight` at once (more are answered `Busy`).
pub(crate) struct Endpoint;

pub(crate) struct EndpointArgs {
    pub service: String,
    pub handler: Arc<dyn WireHandler>,
    pub max_in_flight: usize,
}

pub(crate) struct EndpointState {
    service: String,
    handler: Arc<dyn WireHandler>,
    permits: Arc<Semaphore>,
}

impl Actor for Endpoint {
    type Msg = WireMsg;
    type State = EndpointState;
    type Arguments = EndpointArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<WireMsg>,
        args: EndpointArgs,
    ) -> Result<EndpointState, ActorProcessingErr> {
        Ok(EndpointState {
            service: args.service,
            handler: args.handler,
            permits: Arc::new(Semaphore::new(args.max_in_flight.max(1))),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<WireMsg>,
        msg: WireMsg,
        state: &mut EndpointState,
    ) -> Result<(), ActorProcessingErr> {
        let WireMsg::Call(bytes, reply) = msg;
        let Ok(permit) = state.permits.clone().try_acquire_owned() else {
            metrics::counter!("cluster_requests_rejected_total", "service" => state.service.clone()).increment(1);
            let _ = reply.send(encode_reply(&WireReply::Err(WireError::Busy)));
            return Ok(());
        };
        let (service, handler) = (state.service.clone(), state.handler.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let answer = serve_bytes(&service, handler, &bytes).await;
            // The caller may have timed out and gone: nothing to do then.
            let _ = reply.send(answer);
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl WireHandler for Echo {
        fn handle(self: Arc<Self>, body: Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>> {
            Box::pin(async move { if body.is_empty() { Err("empty".into()) } else { Ok(body) } })
        }
    }

    fn reply(bytes: &[u8]) -> WireReply {
        codec::decode(bytes).expect("replies always decode")
    }

    #[tokio::test]
    async fn garbage_and_unknown_versions_get_error_replies() {
        let h: Arc<dyn WireHandler> = Arc::new(Echo);
        assert!(matches!(reply(&serve_bytes("order", h.clone(), b"").await), WireReply::Err(WireError::Malformed(_))));
        assert!(matches!(
            reply(&serve_bytes("order", h.clone(), &[0xff; 64]).await),
            WireReply::Err(WireError::Malformed(_))
        ));
        let future =
            codec::encode(&WireRequest { version: 99, service: "order".into(), body: vec![1] }).unwrap_or_default();
        assert_eq!(
            reply(&serve_bytes("order", h.clone(), &future).await),
            WireReply::Err(WireError::UnsupportedVersion(99))
        );
        let wrong = codec::encode(&WireRequest { version: WIRE_VERSION, service: "payment".into(), body: vec![1] })
            .unwrap_or_default();
        assert!(matches!(
            reply(&serve_bytes("order", h.clone(), &wrong).await),
            WireReply::Err(WireError::WrongService { .. })
        ));
        let ok = codec::encode(&WireRequest { version: WIRE_VERSION, service: "order".into(), body: vec![7] })
            .unwrap_or_default();
        assert_eq!(reply(&serve_bytes("order", h, &ok).await), WireReply::Ok(vec![7]));
    }
}
