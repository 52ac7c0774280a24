//! The HTTP API of a placement node (axum): the brokers' API under
//! `/placement/v1/` and the Raft RPCs under `/raft/`.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use openraft::error::{Fatal, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::command::{Command, Query};
use crate::error::Error;
use crate::node::{NodeStatus, PlacementNode};
use crate::raft::network::{APPEND_PATH, SNAPSHOT_PATH, SnapshotRequest, VOTE_PATH};
use crate::raft::{NodeId, TypeConfig};

pub const WRITE_PATH: &str = "/placement/v1/write";
pub const QUERY_PATH: &str = "/placement/v1/query";
pub const STATUS_PATH: &str = "/placement/v1/status";
pub const HEARTBEAT_PATH: &str = "/placement/v1/heartbeat";
pub const CLUSTER_PATH: &str = "/placement/v1/cluster";
pub const MEMBERS_PATH: &str = "/placement/v1/members";

/// A segment commit carries a range per shard the broker owns; leave room
/// for thousands of shards.
const API_BODY_LIMIT: usize = 16 << 20;
/// Snapshots hold the whole state machine in one request.
const RAFT_BODY_LIMIT: usize = 256 << 20;

/// GET the name this node holds the bucket lease under (404 without one):
/// a node about to take a lapsed lease asks whether its holder still runs.
async fn bucket_holder(State(node): Node) -> Response {
    match node.bucket_holder() {
        Some(h) => h.to_string().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn heartbeat(
    State(node): Node,
    body: Result<Json<crate::controller::Heartbeat>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(hb)) => answer(node.heartbeat(hb).await),
        Err(rejection) => bad_request(rejection),
    }
}

/// A membership change: `{"add": {"id": 4, "addr": "host:port"}}` or
/// `{"remove": 4}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum MemberChange {
    Add { id: NodeId, addr: String },
    Remove(NodeId),
}

async fn members(State(node): Node, body: Result<Json<MemberChange>, JsonRejection>) -> Response {
    match body {
        Ok(Json(MemberChange::Add { id, addr })) => answer(node.add_node(id, addr).await),
        Ok(Json(MemberChange::Remove(id))) => answer(node.remove_node(id).await),
        Err(rejection) => bad_request(rejection),
    }
}

async fn cluster(State(node): Node) -> Response {
    Json(node.cluster_view()).into_response()
}

/// The JSON body of every error answer.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ErrorBody {
    pub error: String,
    /// [id, "host:port"] of the leader when the answer is 421 and it is known.
    pub leader: Option<(u64, String)>,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, leader) = match &self {
            Error::NotLeader { leader } => (StatusCode::MISDIRECTED_REQUEST, leader.clone()),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, None),
        };
        let body = ErrorBody {
            error: self.to_string(),
            leader,
        };
        (status, Json(body)).into_response()
    }
}

/// POST /placement/v1/write (JSON Command -> JSON Reply), POST
/// /placement/v1/query (Query -> QueryReply), GET /placement/v1/status and
/// the Raft RPCs POST /raft/append, /raft/vote, /raft/snapshot. Errors are
/// JSON `{"error": "...", "leader": [id, "addr"] | null}`, 421 for NotLeader,
/// 500 otherwise.
pub fn router(node: Arc<PlacementNode>) -> Router {
    let api = Router::new()
        .route(WRITE_PATH, post(write))
        .route(QUERY_PATH, post(query))
        .route(STATUS_PATH, get(status))
        .route(crate::bucket::HOLDER_PATH, get(bucket_holder))
        // Brokers' own calls: an operator's token has no business there
        // (a broker registered by hand would receive the cluster secret).
        .route(
            HEARTBEAT_PATH,
            post(heartbeat).layer(axum::middleware::from_fn(shoal_security::nodes_only)),
        )
        .route(CLUSTER_PATH, get(cluster))
        .route(MEMBERS_PATH, post(members))
        .layer(DefaultBodyLimit::max(API_BODY_LIMIT));
    let raft = Router::new()
        .route(APPEND_PATH, post(append))
        .route(VOTE_PATH, post(vote))
        .route(SNAPSHOT_PATH, post(snapshot))
        .layer(DefaultBodyLimit::max(RAFT_BODY_LIMIT))
        // The log and snapshots carry credentials' key material: nodes only.
        .layer(axum::middleware::from_fn(shoal_security::nodes_only));
    api.merge(raft).with_state(node)
}

type Node = State<Arc<PlacementNode>>;

async fn write(
    State(node): Node,
    caller: Option<axum::Extension<shoal_security::Caller>>,
    body: Result<Json<Command>, JsonRejection>,
) -> Response {
    match body {
        // As heartbeats: only brokers register themselves.
        Ok(Json(Command::RegisterBroker { .. }))
            if caller.is_some_and(|c| c.0 == shoal_security::Caller::Operator) =>
        {
            shoal_security::operator_refused()
        }
        Ok(Json(cmd)) => answer(node.write(cmd).await),
        Err(rejection) => bad_request(rejection),
    }
}

async fn query(
    State(node): Node,
    caller: Option<axum::Extension<shoal_security::Caller>>,
    body: Result<Json<Query>, JsonRejection>,
) -> Response {
    match body {
        // Credentials' key material is for brokers, not operators' tokens.
        Ok(Json(Query::Security { .. }))
            if caller.is_some_and(|c| c.0 == shoal_security::Caller::Operator) =>
        {
            shoal_security::operator_refused()
        }
        Ok(Json(q)) => answer(node.query(q).await),
        Err(rejection) => bad_request(rejection),
    }
}

fn answer<T: Serialize>(result: Result<T, Error>) -> Response {
    match result {
        Ok(value) => Json(value).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Unreadable requests get the same JSON error shape, with axum's 4xx status.
fn bad_request(rejection: JsonRejection) -> Response {
    let body = ErrorBody {
        error: rejection.body_text(),
        leader: None,
    };
    (rejection.status(), Json(body)).into_response()
}

async fn status(State(node): Node) -> Json<NodeStatus> {
    Json(node.status())
}

async fn append(
    State(node): Node,
    Json(req): Json<AppendEntriesRequest<TypeConfig>>,
) -> Json<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>> {
    Json(node.raft().append_entries(req).await)
}

async fn vote(
    State(node): Node,
    Json(req): Json<VoteRequest<NodeId>>,
) -> Json<Result<VoteResponse<NodeId>, RaftError<NodeId>>> {
    Json(node.raft().vote(req).await)
}

async fn snapshot(
    State(node): Node,
    Json(req): Json<SnapshotRequest>,
) -> Json<Result<SnapshotResponse<NodeId>, Fatal<NodeId>>> {
    let (vote, snapshot) = req.into_parts();
    Json(node.raft().install_full_snapshot(vote, snapshot).await)
}
