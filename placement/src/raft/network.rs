//! Raft RPCs between placement nodes: JSON POSTs to the peers' `/raft/*`
//! routes (served by [`crate::server::router`]).

use std::future::Future;
use std::io::Cursor;
use std::time::Duration;

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend, RaftNetwork, RaftNetworkFactory, Snapshot};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{NodeId, SnapshotMeta, TypeConfig, Vote};

pub const APPEND_PATH: &str = "/raft/append";
pub const VOTE_PATH: &str = "/raft/vote";
pub const SNAPSHOT_PATH: &str = "/raft/snapshot";

/// The body of `/raft/snapshot`: a whole snapshot in one request. Placement
/// snapshots are JSON (so `data` is text) and small enough not to need
/// openraft's chunked transfer.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotRequest {
    pub vote: Vote,
    pub meta: SnapshotMeta,
    pub data: String,
}

impl SnapshotRequest {
    pub fn into_parts(self) -> (Vote, Snapshot<TypeConfig>) {
        let snapshot = Snapshot {
            meta: self.meta,
            snapshot: Box::new(Cursor::new(self.data.into_bytes())),
        };
        (self.vote, snapshot)
    }
}

/// Hands out one [`PeerClient`] per target; they share reqwest's pool.
#[derive(Clone)]
pub struct Network {
    http: reqwest::Client,
    scheme: &'static str,
}

impl Network {
    pub fn new(auth: &shoal_security::ClientAuth) -> Result<Self, reqwest::Error> {
        let http = auth
            .http_client()
            // Peers are addressed directly; an HTTP(S)_PROXY meant for the
            // outside world must not capture intra-cluster traffic.
            .no_proxy()
            .connect_timeout(Duration::from_secs(2))
            .build()?;
        Ok(Self {
            http,
            scheme: auth.scheme(),
        })
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerClient {
            http: self.http.clone(),
            scheme: self.scheme,
            target,
            addr: node.addr.clone(),
        }
    }
}

pub struct PeerClient {
    http: reqwest::Client,
    scheme: &'static str,
    target: NodeId,
    addr: String,
}

/// How a request failed before the peer could answer.
enum SendError {
    /// Connection refused or similar: the peer is down, back off.
    Unreachable(reqwest::Error),
    Other(String),
}

impl PeerClient {
    /// POSTs `body` and decodes the peer's `Result<Resp, Err>`.
    async fn post<Req, Resp>(
        &self,
        path: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, SendError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let url = format!("{}://{}{path}", self.scheme, self.addr);
        let res = self
            .http
            .post(&url)
            .json(body)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    SendError::Unreachable(e)
                } else {
                    SendError::Other(format!("POST {url}: {e}"))
                }
            })?;
        let status = res.status();
        if !status.is_success() {
            let text = res.text().await.unwrap_or_default();
            return Err(SendError::Other(format!("POST {url}: {status}: {text}")));
        }
        res.json()
            .await
            .map_err(|e| SendError::Other(format!("POST {url}: decoding the reply: {e}")))
    }

    fn rpc_error<E: std::error::Error>(
        &self,
        e: SendError,
    ) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
        match e {
            SendError::Unreachable(e) => RPCError::Unreachable(Unreachable::new(&e)),
            SendError::Other(msg) => {
                RPCError::Network(NetworkError::new(&std::io::Error::other(msg)))
            }
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let res: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> = self
            .post(APPEND_PATH, &rpc, option.hard_ttl())
            .await
            .map_err(|e| self.rpc_error(e))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        // Never called: `full_snapshot` below replaces the chunked transfer.
        Err(RPCError::Network(NetworkError::new(
            &std::io::Error::other("chunked snapshot transfer is not supported; use full_snapshot"),
        )))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let res: Result<VoteResponse<NodeId>, RaftError<NodeId>> = self
            .post(VOTE_PATH, &rpc, option.hard_ttl())
            .await
            .map_err(|e| self.rpc_error(e))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let data = String::from_utf8(snapshot.snapshot.into_inner()).map_err(|e| {
            StreamingError::Network(NetworkError::new(&std::io::Error::other(format!(
                "snapshot is not UTF-8 JSON: {e}"
            ))))
        })?;
        let req = SnapshotRequest {
            vote,
            meta: snapshot.meta,
            data,
        };
        let sent = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            sent = self.post::<_, Result<SnapshotResponse<NodeId>, Fatal<NodeId>>>(
                SNAPSHOT_PATH, &req, option.hard_ttl()) => sent,
        };
        match sent {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(fatal)) => Err(StreamingError::RemoteError(RemoteError::new(
                self.target,
                fatal,
            ))),
            Err(SendError::Unreachable(e)) => {
                Err(StreamingError::Unreachable(Unreachable::new(&e)))
            }
            Err(SendError::Other(msg)) => Err(StreamingError::Network(NetworkError::new(
                &std::io::Error::other(msg),
            ))),
        }
    }
}
