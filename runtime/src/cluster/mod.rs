//! The cluster: membership on ractor_cluster, failure detection, reconnect, shard ownership
//! and remote routing. The only module of the workspace that knows ractor_cluster.
//!
//! ```text
//!   node A                                         node B
//!   service handle ──locate(service, key)──▶ owner? ── B ──▶ ActorRef<WireMsg> (pg "om.order@B")
//!                                                              │ codec-encoded WireRequest, timeout
//!                                                              ▼
//!                                                      Endpoint (remotable router) ──▶ local Router<E> ──▶ entity
//! ```
//!
//! - One remotable [`wire::Endpoint`] per service per node, joined to the process groups
//!   `om.<service>` and `om.<service>@<node>`, plus one `node` endpoint per node for
//!   heartbeats (`om.node@<node>`). Entity actors stay local.
//! - Membership is the static list of peers (stable names): each peer's services are learned
//!   from its heartbeat answers and remembered in `<data dir>/cluster-members`, so ownership is
//!   known even while a member is down, and a member that comes back owns what it owned.
//! - Reconnect: ractor_cluster does not reconnect, so one task per peer re-resolves its
//!   address and reconnects with backoff whenever the peer's node endpoint is missing.
//! - Failure detection: a heartbeat to each peer every `heartbeat_interval`; a peer whose last
//!   answer is older than `suspect_after` (or whose session closed) is down, and requests for
//!   its shards fail fast with `Unavailable` instead of waiting on a frozen process. Marking a
//!   silent peer down also closes its ractor_cluster session: ractor_cluster keeps a frozen
//!   peer's session open forever, which would leave calls to it hanging until their timeout
//!   and keep the reconnect task from ever opening a fresh session once the peer wakes up.
//!   Closing it fails every call in flight to that peer at once (`Unavailable`).
//! - Every heartbeat carries the sender's shard count; a peer with another count is refused
//!   (never marked up, logged as an error), because the two would disagree on every key's owner.

pub mod ownership;
pub mod wire;

use crate::handle::CallError;
use ordermesh_storage::codec;
use ractor::{ActorRef, pg};
use ractor_cluster::{NodeServer, NodeServerMessage};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};
use wire::{BoxFuture, Endpoint, EndpointArgs, WIRE_VERSION, WireError, WireHandler, WireMsg, WireReply, WireRequest};

/// The name of the per-node heartbeat endpoint.
const NODE_SERVICE: &str = "node";

/// A peer as given on the command line: `NAME@HOST:PORT`, or `HOST:PORT` (a DNS name whose
/// addresses are the members; their names are learned when they answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerSpec {
    Named { name: String, addr: String },
    Dns { addr: String },
}

impl FromStr for PeerSpec {
    type Err = String;
    fn from_str(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        let check_addr = |addr: &str| match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(addr.to_owned()),
            _ => Err(format!("peer address `{addr}` is not HOST:PORT")),
        };
        match raw.split_once('@') {
            Some((name, addr)) => {
                if !valid_name(name) {
                    return Err(format!("peer name `{name}` must be 1-64 of [A-Za-z0-9_.-]"));
                }
                Ok(PeerSpec::Named { name: name.to_owned(), addr: check_addr(addr)? })
            }
            None => Ok(PeerSpec::Dns { addr: check_addr(raw)? }),
        }
    }
}

/// Node names: 1-64 characters of `[A-Za-z0-9_.-]`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Everything a node needs to join its cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub name: String,
    /// Where the cluster transport listens.
    pub listen: SocketAddr,
    /// `HOST:PORT` peers reach this node at.
    pub advertise: String,
    pub peers: Vec<PeerSpec>,
    /// The services this node hosts.
    pub services: Vec<String>,
    pub cookie: String,
    /// Where the learned membership is remembered.
    pub data_dir: PathBuf,
    pub shards: u32,
    pub heartbeat_interval: Duration,
    /// A peer silent this long is down.
    pub suspect_after: Duration,
    /// Requests in flight to one peer at once (more fail fast as overloaded).
    pub max_in_flight_per_peer: usize,
    /// Requests one endpoint (router) runs at once (more are answered busy).
    pub max_in_flight_per_router: usize,
}

impl ClusterConfig {
    pub fn new(name: String, listen: SocketAddr, advertise: String, cookie: String, data_dir: PathBuf) -> Self {
        Self {
            name,
            listen,
            advertise,
            peers: vec![],
            services: vec![],
            cookie,
            data_dir,
            shards: ownership::DEFAULT_SHARDS,
            heartbeat_interval: Duration::from_millis(500),
            suspect_after: Duration::from_millis(2500),
            max_in_flight_per_peer: 1024,
            max_in_flight_per_router: 2048,
        }
    }
}

/// What a node says about itself in a heartbeat answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum NodeRequest {
    /// `shards`: the sender's shard count, so the receiver can refuse a mismatched peer too.
    Ping { from: String, shards: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct NodeInfo {
    name: String,
    services: Vec<String>,
    /// Shards per service on that node; members must agree or ownership diverges.
    shards: u32,
}

#[derive(Debug)]
struct Member {
    /// `None` until the member has answered once (or the remembered list says).
    services: Option<Vec<String>>,
    up: bool,
    last_ok: Option<Instant>,
    in_flight: Arc<Semaphore>,
    /// The shard count it announced, when it differs from ours (logged once, not spammed
    /// every heartbeat).
    shard_mismatch: Option<u32>,
}

/// Where a request for a key goes.
pub enum Target {
    /// This node owns the key: use the local router.
    Local,
    Remote(RemoteRouter),
}

/// The router of a service on another node.
#[derive(Clone)]
pub struct RemoteRouter {
    actor: ActorRef<WireMsg>,
    service: &'static str,
    node: String,
    in_flight: Arc<Semaphore>,
}

impl RemoteRouter {
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Sends a codec-encoded service request, returns the codec-encoded response.
    pub async fn call(&self, body: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, RemoteError> {
        let service = self.service;
        let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
            metrics::counter!("cluster_calls_rejected_total", "peer" => self.node.clone()).increment(1);
            return Err(RemoteError::Call(CallError::Overloaded { service }));
        };
        let request = codec::encode(&WireRequest { version: WIRE_VERSION, service: service.to_owned(), body })
            .map_err(|e| RemoteError::Wire(WireError::Malformed(e.to_string())))?;
        let answer = self
            .actor
            .call(|reply| WireMsg::Call(request, reply), Some(timeout))
            .await
            .map_err(|_| RemoteError::Call(CallError::Unavailable { service }))?;
        let bytes = match answer {
            ractor::rpc::CallResult::Success(bytes) => bytes,
            ractor::rpc::CallResult::Timeout => return Err(RemoteError::Call(CallError::Timeout { service, timeout })),
            ractor::rpc::CallResult::SenderError => return Err(RemoteError::Call(CallError::Unavailable { service })),
        };
        match codec::decode::<WireReply>(&bytes) {
            Ok(WireReply::Ok(body)) => Ok(body),
            Ok(WireReply::Err(WireError::Busy)) => Err(RemoteError::Call(CallError::Overloaded { service })),
            Ok(WireReply::Err(err)) => Err(RemoteError::Wire(err)),
            Err(err) => Err(RemoteError::Wire(WireError::Malformed(err.to_string()))),
        }
    }
}

/// Why a remote call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Call(#[from] CallError),
    #[error("peer answered with an error: {0}")]
    Wire(WireError),
}

/// A running cluster membership (one per process).
pub struct Cluster {
    config: ClusterConfig,
    server: ActorRef<NodeServerMessage>,
    members: RwLock<BTreeMap<String, Member>>,
    shutdown: watch::Sender<bool>,
}

fn group(service: &str, node: &str) -> String {
    format!("om.{service}@{node}")
}

fn leak(service: &str) -> &'static str {
    match service {
        "order" => "order",
        "inventory" => "inventory",
        "payment" => "payment",
        "node" => NODE_SERVICE,
        _ => "remote",
    }
}

const MEMBERS_FILE: &str = "cluster-members";

impl Cluster {
    /// Starts the transport (listening on `config.listen`), the heartbeat endpoint, and the
    /// connect/heartbeat loops of every peer.
    pub async fn start(config: ClusterConfig) -> Result<Arc<Cluster>, String> {
        if !valid_name(&config.name) {
            return Err(format!("node name `{}` must be 1-64 of [A-Za-z0-9_.-]", config.name));
        }
        if config.cookie.is_empty() {
            return Err("the cluster cookie is empty".into());
        }
        let host = config.advertise.rsplit_once(':').map_or(config.advertise.clone(), |(h, _)| h.to_owned());
        let server = NodeServer::new(
            config.listen.port(),
            config.cookie.clone(),
            config.name.clone(),
            host,
            None,
            Some(ractor_cluster::node::NodeConnectionMode::Isolated),
        )
        .with_listen_addr(config.listen.ip());
        let (server, _) = ractor::Actor::spawn(None, server, ())
            .await
            .map_err(|e| format!("cannot start the cluster transport on {}: {e}", config.listen))?;

        let mut members = BTreeMap::new();
        let remembered = load_members(&config.data_dir);
        for peer in &config.peers {
            if let PeerSpec::Named { name, .. } = peer
                && *name != config.name
            {
                members.insert(name.clone(), Member::new(remembered.get(name).cloned(), &config));
            }
        }
        for (name, services) in remembered {
            if name != config.name {
                members.entry(name).or_insert_with(|| Member::new(None, &config)).services.get_or_insert(services);
            }
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        let cluster = Arc::new(Cluster { config, server, members: RwLock::new(members), shutdown });
        cluster.serve(NODE_SERVICE, Arc::new(NodeEndpoint(cluster.info())), 64).await?;

        for peer in cluster.config.peers.clone() {
            tokio::spawn(connect_loop(cluster.clone(), peer, shutdown_rx.clone()));
        }
        tokio::spawn(heartbeat_loop(cluster.clone(), shutdown_rx));
        Ok(cluster)
    }

    fn info(&self) -> NodeInfo {
        NodeInfo { name: self.config.name.clone(), services: self.config.services.clone(), shards: self.config.shards }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn shards(&self) -> u32 {
        self.config.shards
    }

    /// Hosts `handler` as this node's remotable router of `service`.
    pub async fn serve(
        &self,
        service: &str,
        handler: Arc<dyn WireHandler>,
        max_in_flight: usize,
    ) -> Result<(), String> {
        let args = EndpointArgs { service: service.to_owned(), handler, max_in_flight };
        let (actor, _) = ractor::Actor::spawn(None, Endpoint, args)
            .await
            .map_err(|e| format!("cannot start the {service} endpoint: {e}"))?;
        pg::join(group(service, &self.config.name), vec![actor.get_cell()]);
        pg::join(format!("om.{service}"), vec![actor.get_cell()]);
        Ok(())
    }

    /// The default in-flight bound of a service endpoint.
    pub fn max_in_flight_per_router(&self) -> usize {
        self.config.max_in_flight_per_router
    }

    /// Every member known to host `service` (this node included), sorted by name; `Err` while
    /// some member's services are still unknown (ownership would not be decidable).
    pub fn members_of(&self, service: &str) -> Result<Vec<String>, CallError> {
        let members = self.members.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        if self.config.services.iter().any(|s| s == service) {
            out.push(self.config.name.clone());
        }
        for (name, member) in members.iter() {
            match &member.services {
                Some(services) if services.iter().any(|s| s == service) => out.push(name.clone()),
                Some(_) => {}
                None => return Err(CallError::Unavailable { service: leak(service) }),
            }
        }
        out.sort();
        Ok(out)
    }

    /// Where a request for `key` of `service` must go. `Err(Unavailable)` fast when the owner
    /// is down or unknown.
    pub fn locate(&self, service: &'static str, key: &str) -> Result<Target, CallError> {
        let members = self.members_of(service)?;
        let owner = ownership::owner_of_key(service, key, self.config.shards, &members)
            .ok_or(CallError::Unavailable { service })?;
        self.target(service, owner)
    }

    /// Whether this node owns a key of `service`, as a test for picking new keys it will own
    /// (the members are read once); `None` while ownership is undecidable.
    pub fn owned_here<'a>(&'a self, service: &'a str) -> Option<impl Fn(&str) -> bool + 'a> {
        let members = self.members_of(service).ok()?;
        Some(move |key: &str| {
            ownership::owner_of_key(service, key, self.config.shards, &members) == Some(self.config.name.as_str())
        })
    }

    /// The router of `service` on `node` (this node: `Local`).
    pub fn target(&self, service: &'static str, node: &str) -> Result<Target, CallError> {
        if node == self.config.name {
            return Ok(Target::Local);
        }
        let in_flight = {
            let members = self.members.read().unwrap_or_else(|e| e.into_inner());
            let member = members.get(node).ok_or(CallError::Unavailable { service })?;
            if !member.up {
                return Err(CallError::Unavailable { service });
            }
            member.in_flight.clone()
        };
        let cell =
            pg::get_members(&group(service, node)).into_iter().next().ok_or(CallError::Unavailable { service })?;
        Ok(Target::Remote(RemoteRouter { actor: cell.into(), service, node: node.to_owned(), in_flight }))
    }

    /// Shard of `key` (for services that place new keys in a chosen shard).
    pub fn shard_of(&self, key: &str) -> u32 {
        ownership::shard_of(key, self.config.shards)
    }

    /// True once every configured peer's services are known (ownership is decidable).
    pub fn joined(&self) -> bool {
        let members = self.members.read().unwrap_or_else(|e| e.into_inner());
        members.values().all(|m| m.services.is_some())
    }

    /// `(name, up)` of every peer.
    pub fn peers(&self) -> Vec<(String, bool)> {
        let members = self.members.read().unwrap_or_else(|e| e.into_inner());
        members.iter().map(|(n, m)| (n.clone(), m.up)).collect()
    }

    /// Stops the loops and the transport.
    pub fn stop(&self) {
        let _ = self.shutdown.send(true);
        self.server.stop(Some("shutdown".into()));
    }

    fn record_answer(&self, info: NodeInfo) {
        let mut changed = false;
        {
            let mut members = self.members.write().unwrap_or_else(|e| e.into_inner());
            let member = members.entry(info.name.clone()).or_insert_with(|| Member::new(None, &self.config));
            if info.shards != self.config.shards {
                // Never up: the two nodes would route the same key to different owners.
                if member.shard_mismatch != Some(info.shards) {
                    tracing::error!(
                        peer = info.name,
                        peer_shards = info.shards,
                        shards = self.config.shards,
                        "peer has a different shard count: refusing it (every member must run with the same --shards)"
                    );
                    member.shard_mismatch = Some(info.shards);
                }
                return;
            }
            member.shard_mismatch = None;
            if member.services.as_ref() != Some(&info.services) {
                member.services = Some(info.services);
                changed = true;
            }
            if !member.up {
                tracing::info!(peer = info.name, "peer is up");
                metrics::gauge!("cluster_peer_up", "peer" => info.name.clone()).set(1.0);
            }
            member.up = true;
            member.last_ok = Some(Instant::now());
        }
        if changed {
            self.save_members();
        }
    }

    fn save_members(&self) {
        let known: BTreeMap<String, Vec<String>> = {
            let members = self.members.read().unwrap_or_else(|e| e.into_inner());
            members.iter().filter_map(|(n, m)| Some((n.clone(), m.services.clone()?))).collect()
        };
        let Ok(bytes) = codec::encode(&known) else { return };
        let path = self.config.data_dir.join(MEMBERS_FILE);
        let tmp = path.with_extension("tmp");
        if let Err(err) = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path)) {
            tracing::warn!(error = %err, "cannot remember the cluster membership");
        }
    }

    /// Marks `name` down if its session is gone or it has been silent for `suspect_after`.
    /// True when it was up until now and its session is still open (the caller closes it).
    fn mark_down_if_silent(&self, name: &str, session_gone: bool) -> bool {
        let mut members = self.members.write().unwrap_or_else(|e| e.into_inner());
        let Some(member) = members.get_mut(name) else { return false };
        let silent = member.last_ok.is_none_or(|t| t.elapsed() >= self.config.suspect_after);
        if member.up && (session_gone || silent) {
            let silent_ms = member.last_ok.map(|t| t.elapsed().as_millis() as u64);
            tracing::warn!(peer = name, session_gone, silent_ms, "peer is down");
            metrics::counter!("cluster_peer_down_total").increment(1);
            metrics::gauge!("cluster_peer_up", "peer" => name.to_owned()).set(0.0);
            member.up = false;
            return !session_gone;
        }
        false
    }

    /// Closes every ractor_cluster session to the peer `name`. Its remote actors stop with it,
    /// which drops their pending reply ports: callers waiting on the peer get `Unavailable`
    /// now rather than at their timeout. The reconnect task opens a fresh session once the
    /// peer answers again.
    async fn close_sessions(&self, name: &str) {
        let sessions = match self.server.call(NodeServerMessage::GetSessions, Some(Duration::from_secs(1))).await {
            Ok(ractor::rpc::CallResult::Success(sessions)) => sessions,
            _ => return,
        };
        for session in sessions.values() {
            // ractor_cluster names a node `NAME@HOST`.
            let peer = session.peer_name.as_ref().map(|n| n.name.split('@').next().unwrap_or_default());
            if peer == Some(name) {
                tracing::info!(peer = name, addr = session.peer_addr, "closing the session of a silent peer");
                session.actor.kill();
            }
        }
    }
}

impl Member {
    fn new(services: Option<Vec<String>>, config: &ClusterConfig) -> Self {
        Member {
            services,
            up: false,
            last_ok: None,
            in_flight: Arc::new(Semaphore::new(config.max_in_flight_per_peer)),
            shard_mismatch: None,
        }
    }
}

fn load_members(dir: &std::path::Path) -> BTreeMap<String, Vec<String>> {
    match std::fs::read(dir.join(MEMBERS_FILE)) {
        Ok(bytes) => codec::decode(&bytes).unwrap_or_else(|err| {
            tracing::warn!(error = %err, "ignoring an unreadable membership file");
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    }
}

/// Answers heartbeats with this node's name and services.
struct NodeEndpoint(NodeInfo);

impl WireHandler for NodeEndpoint {
    fn handle(self: Arc<Self>, body: Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>> {
        Box::pin(async move {
            let NodeRequest::Ping { from, shards } = codec::decode::<NodeRequest>(&body).map_err(|e| e.to_string())?;
            if shards != self.0.shards {
                // The pinger logs and refuses us when it sees our answer; say why here too.
                return Err(format!("{from} runs {shards} shards, {} runs {}", self.0.name, self.0.shards));
            }
            codec::encode(&self.0).map_err(|e| e.to_string())
        })
    }
}

/// Keeps a session to `peer` open: whenever its node endpoint is missing, re-resolve the
/// address and connect, with exponential backoff (ractor_cluster does not reconnect).
async fn connect_loop(cluster: Arc<Cluster>, peer: PeerSpec, mut shutdown: watch::Receiver<bool>) {
    let backoff = crate::Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
    let mut attempt = 0u32;
    loop {
        let (connected, addr) = match &peer {
            PeerSpec::Named { name, addr } => {
                (*name == cluster.config.name || !pg::get_members(&group(NODE_SERVICE, name)).is_empty(), addr.clone())
            }
            // A DNS peer counts as connected when every address it resolves to has a session.
            PeerSpec::Dns { addr } => (dns_peers_connected(&cluster, addr).await, addr.clone()),
        };
        let delay = if connected {
            attempt = 0;
            Duration::from_millis(500)
        } else {
            match tokio::net::lookup_host(&addr).await {
                Ok(addrs) => {
                    for target in addrs {
                        if let Err(err) = ractor_cluster::client_connect(&cluster.server, target).await {
                            tracing::debug!(peer = addr, error = %err, "cannot connect");
                        }
                    }
                }
                Err(err) => tracing::debug!(peer = addr, error = %err, "cannot resolve"),
            }
            // Give the handshake time before judging it, then back off.
            let d = Duration::from_millis(300) + backoff.delay(attempt);
            attempt = attempt.saturating_add(1);
            d
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn dns_peers_connected(cluster: &Cluster, addr: &str) -> bool {
    let Ok(addrs) = tokio::net::lookup_host(addr).await else { return false };
    let Ok(ractor::rpc::CallResult::Success(sessions)) =
        cluster.server.call(NodeServerMessage::GetSessions, Some(Duration::from_secs(1))).await
    else {
        return false;
    };
    let advertise = cluster.config.advertise.clone();
    addrs
        .filter(|a| a.to_string() != advertise && *a != cluster.config.listen)
        .all(|a| sessions.values().any(|s| s.peer_addr == a.to_string()))
}

/// Pings every peer's node endpoint each interval; records answers, marks silent peers down.
async fn heartbeat_loop(cluster: Arc<Cluster>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(cluster.config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ping = codec::encode(&NodeRequest::Ping { from: cluster.config.name.clone(), shards: cluster.config.shards })
        .unwrap_or_default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        // Every node endpoint in the group, including peers learned through DNS.
        let names: Vec<String> = cluster.members.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        for name in names {
            let cells = pg::get_members(&group(NODE_SERVICE, &name));
            let Some(cell) = cells.into_iter().next() else {
                cluster.mark_down_if_silent(&name, true);
                continue;
            };
            // Judge silence every tick, not only when a ping times out: a frozen peer is then
            // down `suspect_after` after its last answer, not up to a ping timeout later.
            if cluster.mark_down_if_silent(&name, false) {
                let cluster = cluster.clone();
                let name = name.clone();
                tokio::spawn(async move { cluster.close_sessions(&name).await });
            }
            let remote = RemoteRouter {
                actor: cell.into(),
                service: NODE_SERVICE,
                node: name.clone(),
                in_flight: Arc::new(Semaphore::new(1)),
            };
            let cluster = cluster.clone();
            let ping = ping.clone();
            let timeout = cluster.config.suspect_after.min(Duration::from_secs(2));
            tokio::spawn(async move {
                match remote.call(ping, timeout).await {
                    Ok(bytes) => match codec::decode::<NodeInfo>(&bytes) {
                        Ok(info) if info.name == name => cluster.record_answer(info),
                        Ok(info) => {
                            tracing::warn!(peer = name, answered = info.name, "heartbeat answered by another node")
                        }
                        Err(err) => tracing::warn!(peer = name, error = %err, "unreadable heartbeat answer"),
                    },
                    Err(RemoteError::Wire(err)) => tracing::warn!(peer = name, error = %err, "heartbeat refused"),
                    // Silence: the next tick judges it against `suspect_after`.
                    Err(RemoteError::Call(_)) => {}
                }
            });
        }
        // Peers learned only through DNS: every node endpoint we see but do not know yet.
        for cell in pg::get_members(&format!("om.{NODE_SERVICE}")) {
            if cell.get_id().is_local() {
                continue;
            }
            let remote = RemoteRouter {
                actor: cell.into(),
                service: NODE_SERVICE,
                node: String::new(),
                in_flight: Arc::new(Semaphore::new(1)),
            };
            let cluster = cluster.clone();
            let ping = ping.clone();
            tokio::spawn(async move {
                if let Some(info) = remote
                    .call(ping, Duration::from_secs(1))
                    .await
                    .ok()
                    .and_then(|b| codec::decode::<NodeInfo>(&b).ok())
                {
                    let known = cluster.members.read().unwrap_or_else(|e| e.into_inner()).contains_key(&info.name);
                    if !known && info.name != cluster.config.name {
                        cluster.record_answer(info);
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse() {
        assert_eq!(
            "b@127.0.0.1:7001".parse::<PeerSpec>(),
            Ok(PeerSpec::Named { name: "b".into(), addr: "127.0.0.1:7001".into() })
        );
        assert_eq!(
            "ordermesh.default.svc:7000".parse::<PeerSpec>(),
            Ok(PeerSpec::Dns { addr: "ordermesh.default.svc:7000".into() })
        );
        assert!("b@nowhere".parse::<PeerSpec>().is_err());
        assert!("b c@h:1".parse::<PeerSpec>().is_err());
        assert!("@h:1".parse::<PeerSpec>().is_err());
    }
}
