//! How brokers, the compactor and the CLI talk to placement: in process to a
//! standalone node, or over HTTP to a cluster, finding the leader and
//! retrying across leader changes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use shoal_security::ClientAuth;

use crate::command::{Command, Query, QueryReply, Reply};
use crate::controller::{Heartbeat, HeartbeatReply};
use crate::error::{Error, Result};
use crate::model::{GroupOffset, Stream};
use crate::node::PlacementNode;
use crate::server::{ErrorBody, HEARTBEAT_PATH, QUERY_PATH, WRITE_PATH};

/// How long a call keeps retrying (leader election, a node restarting).
const RETRY_FOR: Duration = Duration::from_secs(10);
/// One HTTP attempt; a write waits for a quorum, so allow for a slow one.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct PlacementClient {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Local(Arc<PlacementNode>),
    Remote(Arc<Remote>),
}

impl std::fmt::Debug for PlacementClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Inner::Local(node) => f.debug_tuple("PlacementClient::Local").field(node).finish(),
            Inner::Remote(r) => f
                .debug_tuple("PlacementClient::Remote")
                .field(&r.addrs)
                .finish(),
        }
    }
}

impl PlacementClient {
    /// In-process: calls the node directly (standalone).
    pub fn local(node: Arc<PlacementNode>) -> Self {
        Self {
            inner: Inner::Local(node),
        }
    }

    /// Over HTTP to any of these host:port addresses, presenting `auth`
    /// (the cluster secret, or an operator's token); follows NotLeader
    /// hints, tries the others and retries with backoff for up to ~10 s.
    pub fn remote(addrs: Vec<String>, auth: &ClientAuth) -> Self {
        let http = auth
            .http_client()
            .no_proxy()
            .connect_timeout(Duration::from_secs(2))
            .build()
            // Building without TLS or proxy settings cannot fail; keep a
            // default client rather than panic if it ever does.
            .unwrap_or_default();
        Self {
            inner: Inner::Remote(Arc::new(Remote {
                http,
                auth: auth.clone(),
                addrs,
                leader: Mutex::new(None),
            })),
        }
    }

    pub async fn write(&self, cmd: Command) -> Result<Reply> {
        match &self.inner {
            Inner::Local(node) => retry_local(|| node.write(cmd.clone())).await,
            // Only retried where the command surely was not applied.
            Inner::Remote(r) => r.call(WRITE_PATH, &cmd, false).await,
        }
    }

    pub async fn query(&self, q: Query) -> Result<QueryReply> {
        match &self.inner {
            Inner::Local(node) => retry_local(|| node.query(q.clone())).await,
            Inner::Remote(r) => r.call(QUERY_PATH, &q, true).await,
        }
    }

    /// Tell the leader this broker is alive; get the assignment back. Tried
    /// once per address (the caller heartbeats again soon anyway).
    pub async fn heartbeat(&self, hb: &Heartbeat) -> Result<HeartbeatReply> {
        match &self.inner {
            Inner::Local(node) => node.heartbeat(hb.clone()).await,
            Inner::Remote(r) => r.call(HEARTBEAT_PATH, hb, true).await,
        }
    }

    pub async fn list_streams(&self) -> Result<Vec<Stream>> {
        match self.query(Query::ListStreams).await? {
            QueryReply::Streams { streams } => Ok(streams),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn get_stream(&self, name: &str) -> Result<Option<Stream>> {
        let q = Query::GetStream {
            name: name.to_string(),
        };
        match self.query(q).await? {
            QueryReply::Stream { stream } => Ok(stream),
            other => Err(unexpected(&other)),
        }
    }

    /// stream -> shard -> committed offset of `group`.
    pub async fn group_offsets(
        &self,
        group: &str,
    ) -> Result<BTreeMap<String, BTreeMap<i32, GroupOffset>>> {
        let q = Query::GroupOffsets {
            group: group.to_string(),
        };
        match self.query(q).await? {
            QueryReply::GroupOffsets { offsets } => Ok(offsets),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn list_groups(&self) -> Result<Vec<String>> {
        match self.query(Query::ListGroups).await? {
            QueryReply::Groups { groups } => Ok(groups),
            other => Err(unexpected(&other)),
        }
    }

    /// stream -> each shard's `index_version`, the cluster-wide default
    /// `retention.ms` and the compaction totals.
    pub async fn index_versions(&self) -> Result<IndexVersions> {
        match self.query(Query::IndexVersions).await? {
            QueryReply::IndexVersions {
                versions,
                default_retention_ms,
                compaction,
            } => Ok(IndexVersions {
                versions,
                default_retention_ms,
                compaction,
            }),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn mqtt_persist_rules(&self) -> Result<Vec<crate::model::MqttPersistRule>> {
        match self.query(Query::MqttPersist).await? {
            QueryReply::MqttPersist { rules } => Ok(rules),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn lifecycle(&self) -> Result<crate::lifecycle::Lifecycle> {
        match self.query(Query::Lifecycle).await? {
            QueryReply::Lifecycle { lifecycle } => Ok(lifecycle),
            other => Err(unexpected(&other)),
        }
    }
}

/// What [`PlacementClient::index_versions`] returns.
#[derive(Debug, Clone)]
pub struct IndexVersions {
    /// stream -> each shard's `index_version`.
    pub versions: BTreeMap<String, Vec<u64>>,
    pub default_retention_ms: i64,
    pub compaction: crate::lifecycle::CompactionTotals,
}

fn unexpected(reply: &QueryReply) -> Error {
    Error::Http(format!("unexpected placement reply {reply:?}"))
}

/// A standalone node is briefly leaderless while it starts; wait that out.
async fn retry_local<T, F, Fut>(mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = Instant::now() + RETRY_FOR;
    let mut backoff = FIRST_BACKOFF;
    loop {
        match call().await {
            Err(Error::NotLeader { leader: None }) if Instant::now() + backoff < deadline => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            other => return other,
        }
    }
}

struct Remote {
    http: reqwest::Client,
    /// For the URLs: `http` or `https`.
    auth: ClientAuth,
    addrs: Vec<String>,
    /// The last address that answered; tried first.
    leader: Mutex<Option<String>>,
}

/// The outcome of one failed attempt.
enum Attempt {
    /// Not the leader; the hint says who is, if known.
    NotLeader(Option<(u64, String)>),
    /// Nothing reached the node: retrying cannot apply a write twice.
    Unreachable(Error),
    /// The node may have acted on the request.
    Failed(Error),
}

impl Remote {
    fn base(&self, addr: &str) -> String {
        self.auth.url(addr)
    }

    fn remembered(&self) -> Option<String> {
        self.leader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn remember(&self, addr: Option<String>) {
        *self.leader.lock().unwrap_or_else(PoisonError::into_inner) = addr;
    }

    /// Sends to the leader (as far as known), moving on to the next address
    /// or the hinted leader when that fails. `idempotent` calls are also
    /// retried after failures where the node may have acted.
    async fn call<Req, Resp>(&self, path: &str, body: &Req, idempotent: bool) -> Result<Resp>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        if self.addrs.is_empty() {
            return Err(Error::Config("no placement addresses given".into()));
        }
        let deadline = Instant::now() + RETRY_FOR;
        let mut backoff = FIRST_BACKOFF;
        let mut next = self.remembered();
        let mut rotation = 0;
        // A hint is followed at once, but two hints in a row without success
        // (an election in progress) wait like any other failure.
        let mut followed_hint = false;
        loop {
            let addr = next.take().unwrap_or_else(|| {
                let addr = self.addrs[rotation % self.addrs.len()].clone();
                rotation += 1;
                addr
            });
            let last_error = match self.send(&addr, path, body).await {
                Ok(resp) => {
                    self.remember(Some(addr));
                    return Ok(resp);
                }
                Err(Attempt::NotLeader(Some((id, hint)))) if !followed_hint && hint != addr => {
                    followed_hint = true;
                    next = Some(hint.clone());
                    self.remember(Some(hint));
                    tracing::debug!(%addr, leader = id, "placement: following the leader hint");
                    continue;
                }
                Err(Attempt::NotLeader(leader)) => {
                    self.remember(None);
                    Error::NotLeader { leader }
                }
                Err(Attempt::Unreachable(e)) => {
                    self.remember(None);
                    e
                }
                // Retrying with the same credential cannot help.
                Err(Attempt::Failed(e @ Error::Unauthorized { .. })) => return Err(e),
                Err(Attempt::Failed(e)) if idempotent => e,
                Err(Attempt::Failed(e)) => return Err(e),
            };
            followed_hint = false;
            if Instant::now() + backoff >= deadline {
                return Err(last_error);
            }
            tracing::debug!(%addr, error = %last_error, "placement: retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn send<Req, Resp>(&self, addr: &str, path: &str, body: &Req) -> Result<Resp, Attempt>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let url = format!("{}{path}", self.base(addr));
        let res = self
            .http
            .post(&url)
            .json(body)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| {
                let err = Error::Http(format!("POST {url}: {e}"));
                if e.is_connect() {
                    Attempt::Unreachable(err)
                } else {
                    Attempt::Failed(err)
                }
            })?;
        let status = res.status();
        if status.is_success() {
            return res.json().await.map_err(|e| {
                Attempt::Failed(Error::Http(format!("POST {url}: decoding the reply: {e}")))
            });
        }
        let bytes = res.bytes().await.unwrap_or_default();
        let body: Option<ErrorBody> = serde_json::from_slice(&bytes).ok();
        if status == reqwest::StatusCode::MISDIRECTED_REQUEST {
            return Err(Attempt::NotLeader(body.and_then(|b| b.leader)));
        }
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(Attempt::Failed(Error::Unauthorized { addr: addr.into() }));
        }
        let message = match body {
            Some(b) => b.error,
            None => String::from_utf8_lossy(&bytes).into_owned(),
        };
        Err(Attempt::Failed(Error::Http(format!(
            "POST {url}: {status}: {message}"
        ))))
    }
}
