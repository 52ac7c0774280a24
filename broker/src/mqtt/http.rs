//! MQTT admin routes: persistence rules (kept in placement, so any broker
//! serves them, MQTT listener or not), and the connected clients and
//! subscriptions of this broker.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use shoal_placement::{Command, MqttPersistRule, Reply};

use super::Mqtt;
use crate::Broker;

#[derive(Clone)]
struct AppState {
    broker: Arc<Broker>,
    mqtt: Option<Arc<Mqtt>>,
}

pub fn router(broker: Arc<Broker>, mqtt: Option<Arc<Mqtt>>) -> Router {
    Router::new()
        .route(
            "/api/v1/mqtt/persist",
            get(list_rules).put(put_rule).delete(delete_rule),
        )
        .route(
            "/api/v1/mqtt/forward",
            axum::routing::post(forwarded).layer(axum::extract::DefaultBodyLimit::max(
                mqtt.as_ref()
                    .map_or(0, |m| m.settings.max_packet_size.saturating_mul(2))
                    .max(4 << 20),
            )),
        )
        .route(
            "/api/v1/mqtt/append",
            axum::routing::post(append).layer(axum::extract::DefaultBodyLimit::max(
                mqtt.as_ref()
                    .map_or(0, |m| m.settings.max_packet_size.saturating_mul(1024))
                    .clamp(4 << 20, 256 << 20),
            )),
        )
        .route("/api/v1/mqtt/takeover", axum::routing::post(takeover))
        .route("/api/v1/mqtt/stored", axum::routing::post(stored))
        .route("/api/v1/mqtt/retained", get(retained))
        .route("/api/v1/mqtt/clients", get(clients))
        .route("/api/v1/mqtt/subscriptions", get(subscriptions))
        .with_state(AppState { broker, mqtt })
}

fn error(code: StatusCode, msg: impl std::fmt::Display) -> Response {
    (code, Json(serde_json::json!({ "error": msg.to_string() }))).into_response()
}

async fn rules_reply(broker: &Broker) -> Response {
    match broker.placement.mqtt_persist_rules().await {
        Ok(rules) => Json(serde_json::json!({ "rules": rules })).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// `GET /api/v1/mqtt/persist`: the rules, in the order they are tried.
async fn list_rules(State(st): State<AppState>) -> Response {
    rules_reply(&st.broker).await
}

#[derive(Deserialize)]
struct RuleBody {
    filter: String,
    stream: String,
    #[serde(default = "one")]
    shards: i32,
}

fn one() -> i32 {
    1
}

/// `PUT /api/v1/mqtt/persist` `{"filter", "stream", "shards"}`: add or
/// replace the rule for `filter`, creating the stream if it is missing.
async fn put_rule(State(st): State<AppState>, Json(body): Json<RuleBody>) -> Response {
    match put(&st.broker, body.filter, body.stream, body.shards).await {
        Ok(()) => {
            refresh(&st).await;
            rules_reply(&st.broker).await
        }
        Err((code, msg)) => error(code, msg),
    }
}

/// Add or replace a rule (also used to seed rules from the config file).
pub async fn put(
    broker: &Arc<Broker>,
    filter: String,
    stream: String,
    shards: i32,
) -> Result<(), (StatusCode, String)> {
    if !super::valid_rule_filter(&filter) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("invalid topic filter {filter:?}"),
        ));
    }
    if broker.stream(&stream).is_none() {
        match broker
            .create_stream(&stream, shards, Default::default(), false)
            .await
        {
            Ok(_) | Err(crate::Error::StreamExists(_)) => {}
            Err(e @ (crate::Error::InvalidTopic(_) | crate::Error::InvalidPartitions(_))) => {
                return Err((StatusCode::BAD_REQUEST, e.to_string()));
            }
            Err(e) => return Err((StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
        }
    }
    let rule = MqttPersistRule {
        filter,
        stream,
        shards,
    };
    match broker
        .placement
        .write(Command::PutMqttPersist { rule })
        .await
    {
        Ok(Reply::Done) => Ok(()),
        Ok(other) => Err((StatusCode::INTERNAL_SERVER_ERROR, format!("{other:?}"))),
        Err(e) => Err((StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

/// This broker applies a changed rule at once (others within a second).
async fn refresh(st: &AppState) {
    if let Some(m) = &st.mqtt
        && let Err(e) = m.load_rules().await
    {
        tracing::debug!("reloading the MQTT persistence rules: {e}");
    }
}

#[derive(Deserialize)]
struct FilterQuery {
    filter: String,
}

/// `DELETE /api/v1/mqtt/persist?filter=...`.
async fn delete_rule(State(st): State<AppState>, Query(q): Query<FilterQuery>) -> Response {
    match st
        .broker
        .placement
        .write(Command::DeleteMqttPersist { filter: q.filter })
        .await
    {
        Ok(_) => {
            refresh(&st).await;
            rules_reply(&st.broker).await
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// `POST /api/v1/mqtt/forward`: messages another broker routes to this
/// one's subscribers (a Kafka record batch, see `forward.rs`).
async fn forwarded(State(st): State<AppState>, body: bytes::Bytes) -> Response {
    let Some(m) = &st.mqtt else {
        return error(StatusCode::NOT_FOUND, "MQTT is not served by this broker");
    };
    let Some(msgs) = super::forward::decode(&body) else {
        return error(StatusCode::BAD_REQUEST, "not a batch of forwarded messages");
    };
    for (msg, plain, groups) in msgs {
        m.hub.deliver_forwarded(msg, plain, groups);
    }
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct AppendTarget {
    stream: String,
    shard: i32,
}

/// `POST /api/v1/mqtt/append?stream=..&shard=..` (from another broker):
/// MQTT publishes (or MQTT state records) for a shard this broker owns, as
/// a record batch; 204 once they are durable. Only streams that persistence
/// rules map to, and the state stream (whether or not this broker serves
/// MQTT: it may own a shard of it all the same).
async fn append(
    State(st): State<AppState>,
    Query(to): Query<AppendTarget>,
    body: bytes::Bytes,
) -> Response {
    let timeout = st
        .mqtt
        .as_ref()
        .map_or(super::Settings::default().persist_timeout, |m| {
            m.settings.persist_timeout
        });
    let mapped = st
        .mqtt
        .as_ref()
        .is_some_and(|m| m.hub.rule_streams().iter().any(|s| **s == *to.stream));
    if to.stream != super::store::STREAM && !mapped {
        return error(
            StatusCode::FORBIDDEN,
            format!("no MQTT persistence rule maps to stream {}", to.stream),
        );
    }
    if to.stream == super::store::STREAM
        && let Some(m) = &st.mqtt
    {
        // Noted first: the index may name a client too many, never miss one.
        let rows = crate::batch::split(body.clone())
            .map(|bs| {
                bs.iter()
                    .filter_map(|b| crate::batch::to_rows(b).ok())
                    .flatten()
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let epoch = st
            .broker
            .stream(super::store::STREAM)
            .and_then(|s| s.shard(to.shard).map(|l| l.epoch()));
        if let Some(epoch) = epoch {
            m.state_index.note(to.shard, epoch, &rows);
        }
    }
    match super::persist::append_for_peer(&st.broker, &to.stream, to.shard, body, timeout).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e @ (crate::Error::NotLeader { .. } | crate::Error::UnknownShard { .. })) => {
            error(StatusCode::MISDIRECTED_REQUEST, e)
        }
        Err(e @ (crate::Error::Corrupt(_) | crate::Error::InvalidRecord(_))) => {
            error(StatusCode::BAD_REQUEST, e)
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// `POST /api/v1/mqtt/takeover` `{"client", "username", "discard", "asker"}`
/// (from another broker, where the client just connected): the session,
/// detached from this broker, as a record batch (or ended, 204, with
/// `discard`: the client started clean); 404 if it is not here, 409 if it
/// is another user's. The answer waits (a while) for the record naming the
/// asker as the session's holder, so that this broker's writes for the
/// session are all in before the asker's.
async fn takeover(
    State(st): State<AppState>,
    Json(req): Json<super::handover::TakeoverRequest>,
) -> Response {
    let Some(m) = &st.mqtt else {
        return error(StatusCode::NOT_FOUND, "MQTT is not served by this broker");
    };
    let now = crate::broker::now_ms();
    let handed = m.hub.hand_over(
        &req.client,
        req.username.as_deref(),
        req.discard,
        req.asker,
        now,
    );
    match handed {
        Ok(Some(_)) if req.discard => StatusCode::NO_CONTENT.into_response(),
        Ok(Some(h)) => {
            let mark = m.hub.op_mark();
            let durable =
                tokio::time::timeout(super::handover::HANDOVER_DURABLE, m.hub.wait_durable(mark))
                    .await
                    .is_ok();
            let body = if durable {
                super::handover::encode(&h).ok()
            } else {
                None
            };
            match body {
                Some(body) => body.into_response(),
                None => {
                    // Its writes might land after the new holder's: the
                    // session stays here, and the client tries again.
                    tracing::warn!(client = %req.client, "an MQTT session handover was called off: its state is not durable yet");
                    m.hub.take_back(&req.client, h, crate::broker::now_ms());
                    error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the session's state is not durable yet",
                    )
                }
            }
        }
        Ok(None) => error(StatusCode::NOT_FOUND, "no such session"),
        Err(_) => error(StatusCode::CONFLICT, "the session is another user's"),
    }
}

/// `POST /api/v1/mqtt/stored` `{"client", "username", "asker"}` (from
/// another broker, where the client connected and no broker held its
/// session): the session as the state stream has it, from the shard of the
/// client's id, which this broker owns; 404 if there is none, 409 if it is
/// another user's, 503 if it went to another broker lately or cannot be
/// read now.
async fn stored(
    State(st): State<AppState>,
    Json(req): Json<super::handover::TakeoverRequest>,
) -> Response {
    let now = crate::broker::now_ms();
    if let Some(m) = &st.mqtt {
        // Taken over here in the meantime: handed over as by a takeover.
        if m.hub.session_user(&req.client).is_some() {
            return takeover(State(st), Json(req)).await;
        }
        // One broker at a time gets a session from the stream.
        let live: Vec<u64> = st.broker.live_brokers().iter().map(|b| b.id).collect();
        if let Some(asker) = req.asker
            && !m.hub.reserve_stored(&req.client, asker, &live, now)
        {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the session went to another broker lately",
            );
        }
    }
    let index = st.mqtt.as_ref().map(|m| &*m.state_index);
    let found =
        super::handover::stored_session(&st.broker, index, &req.client, req.username.as_deref())
            .await;
    if !matches!(found, Ok(Some(_)))
        && let Some(m) = &st.mqtt
        && let Some(asker) = req.asker
    {
        m.hub.unreserve_stored(&req.client, asker);
    }
    match found {
        Ok(Some(h)) => match super::handover::encode(&h) {
            Ok(body) => body.into_response(),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        },
        Ok(None) => error(StatusCode::NOT_FOUND, "no such session"),
        Err(Some(_)) => error(StatusCode::CONFLICT, "the session is another user's"),
        Err(None) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the state stream is not readable",
        ),
    }
}

/// `GET /api/v1/mqtt/retained`: every retained message, as a record batch.
async fn retained(State(st): State<AppState>) -> Response {
    let Some(m) = &st.mqtt else {
        return error(StatusCode::NOT_FOUND, "MQTT is not served by this broker");
    };
    match super::handover::encode_retained(&m.hub.retained_all()) {
        Ok(body) => body.into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn clients(State(st): State<AppState>) -> Response {
    match &st.mqtt {
        Some(m) => Json(serde_json::json!({ "clients": m.clients() })).into_response(),
        None => error(StatusCode::NOT_FOUND, "MQTT is not served by this broker"),
    }
}

async fn subscriptions(State(st): State<AppState>) -> Response {
    match &st.mqtt {
        Some(m) => Json(serde_json::json!({ "subscriptions": m.subscriptions() })).into_response(),
        None => error(StatusCode::NOT_FOUND, "MQTT is not served by this broker"),
    }
}
