//! Hostile input to the placement API: request bodies as JSON, arbitrary
//! and shaped like commands (their tags and field names with extreme
//! values). Whatever decodes is applied to a state machine and every query
//! asked of it; nothing may panic.

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use shoal_placement::{Command, Query, State};

/// Commands' and queries' tags and field names (snake_case), so that
/// generated objects reach past the first key.
const WORDS: &[&str] = &[
    "acquire_compaction_lease",
    "acquire_lease",
    "advance_log_start",
    "allocate_producer_id",
    "alter_stream_config",
    "assign_shard",
    "cancel_handoff",
    "claim_group",
    "commit_offsets",
    "commit_segment",
    "complete_handoff",
    "create_acls",
    "create_partitions",
    "create_stream",
    "delete_acls",
    "delete_group",
    "delete_mqtt_persist",
    "delete_scram_credential",
    "delete_stream",
    "forget_retired",
    "put_mqtt_persist",
    "put_scram_credential",
    "record_compaction_run",
    "register_broker",
    "replace_segments",
    "request_handoff",
    "restore",
    "resume_shard",
    "set_default_retention",
    "stop_shard",
    "bindings",
    "broker",
    "compaction_epoch",
    "config",
    "coordinator_epoch",
    "count",
    "credential",
    "expected_epoch",
    "filter",
    "filters",
    "group",
    "handoff_id",
    "holder",
    "id",
    "info",
    "mechanism",
    "name",
    "now_ms",
    "objects",
    "offset",
    "offsets",
    "partitions",
    "reason",
    "remove",
    "retention_default",
    "retention_ms",
    "rule",
    "run",
    "set",
    "shard",
    "state",
    "stream",
    "to",
    "ttl_ms",
    "user",
    "epoch",
    "key",
    "salt",
    "iterations",
    "stored_key",
    "server_key",
    "list_streams",
    "get_stream",
    "list_groups",
    "list_brokers",
    "index_versions",
    "lifecycle",
    "mqtt_persist",
    "security",
    "users",
    "known",
    "kind",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        prop_oneof![
            Just(i64::MAX),
            Just(i64::MIN),
            Just(-1i64),
            Just(0i64),
            Just(i64::from(i32::MAX)),
            any::<i64>(),
        ]
        .prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        prop_oneof![
            proptest::sample::select(WORDS).prop_map(str::to_string),
            ".{0,12}",
            Just("0".repeat(100)),
            Just("ff".repeat(40)),
        ]
        .prop_map(Value::String),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec(
                (
                    proptest::sample::select(WORDS).prop_map(str::to_string),
                    inner
                ),
                0..6
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// `{"<tag>": <object>}`: an externally tagged command or query.
fn tagged() -> impl Strategy<Value = Value> {
    (proptest::sample::select(WORDS), value()).prop_map(|(tag, v)| json!({ tag: v }))
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Str,
    Int,
    Map,
    List,
    Mechanism,
    Credential,
    Offsets,
    Bindings,
}

/// Commands with every field, by name and kind: generated values of the
/// right shape get past decoding and into the state machine.
const TEMPLATES: &[(&str, &[(&str, Kind)])] = {
    use Kind::*;
    &[
        (
            "create_stream",
            &[
                ("name", Str),
                ("partitions", Int),
                ("config", Map),
                ("id", Int),
                ("now_ms", Int),
            ],
        ),
        ("delete_stream", &[("name", Str)]),
        ("create_partitions", &[("name", Str), ("count", Int)]),
        (
            "alter_stream_config",
            &[("name", Str), ("set", Map), ("remove", List)],
        ),
        (
            "acquire_lease",
            &[("stream", Str), ("shard", Int), ("broker", Int)],
        ),
        (
            "assign_shard",
            &[
                ("stream", Str),
                ("shard", Int),
                ("broker", Int),
                ("expected_epoch", Int),
            ],
        ),
        (
            "request_handoff",
            &[
                ("stream", Str),
                ("shard", Int),
                ("to", Int),
                ("expected_epoch", Int),
            ],
        ),
        (
            "complete_handoff",
            &[
                ("stream", Str),
                ("shard", Int),
                ("to", Int),
                ("expected_epoch", Int),
                ("handoff_id", Int),
            ],
        ),
        (
            "cancel_handoff",
            &[("stream", Str), ("shard", Int), ("expected_epoch", Int)],
        ),
        (
            "stop_shard",
            &[
                ("stream", Str),
                ("shard", Int),
                ("reason", Str),
                ("now_ms", Int),
            ],
        ),
        ("resume_shard", &[("stream", Str), ("shard", Int)]),
        ("claim_group", &[("group", Str)]),
        ("delete_group", &[("group", Str)]),
        (
            "acquire_compaction_lease",
            &[("holder", Str), ("now_ms", Int), ("ttl_ms", Int)],
        ),
        (
            "advance_log_start",
            &[
                ("stream", Str),
                ("shard", Int),
                ("offset", Int),
                ("now_ms", Int),
            ],
        ),
        (
            "forget_retired",
            &[("compaction_epoch", Int), ("objects", List)],
        ),
        ("set_default_retention", &[("retention_ms", Int)]),
        ("delete_mqtt_persist", &[("filter", Str)]),
        (
            "put_scram_credential",
            &[
                ("user", Str),
                ("mechanism", Mechanism),
                ("credential", Credential),
            ],
        ),
        (
            "delete_scram_credential",
            &[("user", Str), ("mechanism", Mechanism)],
        ),
        (
            "commit_offsets",
            &[("group", Str), ("offsets", Offsets), ("now_ms", Int)],
        ),
        ("create_acls", &[("bindings", Bindings)]),
    ]
};

fn field(kind: Kind) -> BoxedStrategy<Value> {
    let name = prop_oneof![
        4 => proptest::sample::select(&["s", "t", "g"][..]).prop_map(str::to_string),
        1 => ".{0,8}",
        1 => Just("x".repeat(300)),
    ];
    let int = prop_oneof![
        4 => -1i64..4,
        1 => proptest::sample::select(vec![i64::MAX, i64::MIN, i64::from(i32::MAX), 10_001]),
        1 => any::<i64>(),
    ];
    match kind {
        Kind::Str => name.prop_map(Value::String).boxed(),
        Kind::Int => int.prop_map(|n| json!(n)).boxed(),
        Kind::Map => proptest::collection::btree_map(
            proptest::sample::select(
                &["retention.ms", "cleanup.policy", "shoal.durability", "x"][..],
            ),
            prop_oneof![
                Just("-1".to_string()),
                Just("compact".to_string()),
                ".{0,6}"
            ],
            0..3,
        )
        .prop_map(|m| json!(m))
        .boxed(),
        Kind::List => proptest::collection::vec(name, 0..3)
            .prop_map(|v| json!(v))
            .boxed(),
        Kind::Mechanism => proptest::sample::select(&["SCRAM-SHA-256", "SCRAM-SHA-512"][..])
            .prop_map(|m| json!(m))
            .boxed(),
        Kind::Credential => {
            let hex = prop_oneof![Just(String::new()), "[0-9a-f]{0,130}"];
            (hex.clone(), int, hex.clone(), hex)
                .prop_map(|(salt, iterations, stored_key, server_key)| {
                    json!({
                        "salt": salt,
                        "iterations": iterations,
                        "stored_key": stored_key,
                        "server_key": server_key,
                    })
                })
                .boxed()
        }
        Kind::Offsets => proptest::collection::vec((name.clone(), int.clone(), int, name), 0..4)
            .prop_map(|v| {
                let offsets: Vec<Value> = v
                    .into_iter()
                    .map(|(stream, shard, offset, metadata)| {
                        json!({
                            "stream": stream, "shard": shard, "offset": offset,
                            "metadata": metadata,
                        })
                    })
                    .collect();
                Value::Array(offsets)
            })
            .boxed(),
        Kind::Bindings => {
            proptest::collection::vec((0i8..15, 0i8..6, 0i8..6, name.clone(), name, 0i8..5), 0..4)
                .prop_map(|v| {
                    use shoal_security::acl::{
                        AclBinding, Operation, PatternType, Permission, ResourceType,
                    };
                    let bindings: Vec<AclBinding> = v
                        .into_iter()
                        .filter_map(|(op, rt, pat, resource, principal, perm)| {
                            Some(AclBinding {
                                resource_type: ResourceType::from_code(rt)?,
                                resource_name: resource,
                                pattern: PatternType::from_code(pat)?,
                                principal: format!("User:{principal}"),
                                host: "*".into(),
                                operation: Operation::from_code(op)?,
                                permission: Permission::from_code(perm)?,
                            })
                        })
                        .collect();
                    serde_json::to_value(bindings).unwrap_or_default()
                })
                .boxed()
        }
    }
}

/// A command from `TEMPLATES` with generated field values.
fn templated() -> impl Strategy<Value = Value> {
    proptest::sample::select(TEMPLATES).prop_flat_map(|(tag, fields)| {
        let values: Vec<BoxedStrategy<Value>> = fields.iter().map(|(_, k)| field(*k)).collect();
        values.prop_map(move |vs| {
            let body: Map<String, Value> = fields
                .iter()
                .zip(vs)
                .map(|((name, _), v)| ((*name).to_string(), v))
                .collect();
            json!({ tag: body })
        })
    })
}

fn queries() -> Vec<Query> {
    let mut out = Vec::new();
    for text in [
        r#""list_streams""#,
        r#""list_groups""#,
        r#""list_brokers""#,
        r#""index_versions""#,
        r#""lifecycle""#,
        r#""mqtt_persist""#,
        r#""users""#,
        r#"{"security":{"known":null}}"#,
    ] {
        if let Ok(q) = serde_json::from_str::<Query>(text) {
            out.push(q);
        }
    }
    out
}

fn exercise(bodies: &[Vec<u8>]) {
    let mut state = State::default();
    for body in bodies {
        if let Ok(cmd) = serde_json::from_slice::<Command>(body) {
            let _ = state.apply(cmd);
        }
        if let Ok(q) = serde_json::from_slice::<Query>(body) {
            let _ = state.query(&q);
        }
    }
    for q in queries() {
        let _ = state.query(&q);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bodies in proptest::collection::vec(
        proptest::collection::vec(any::<u8>(), 0..256), 1..4)) {
        exercise(&bodies);
    }

    #[test]
    fn command_shaped_json_never_panics(cmds in proptest::collection::vec(tagged(), 1..6)) {
        let bodies: Vec<Vec<u8>> = cmds.iter().map(|v| v.to_string().into_bytes()).collect();
        exercise(&bodies);
    }

    #[test]
    fn sequences_of_commands_with_extreme_values_never_panic(
        cmds in proptest::collection::vec(templated(), 1..12)
    ) {
        let bodies: Vec<Vec<u8>> = cmds.iter().map(|v| v.to_string().into_bytes()).collect();
        exercise(&bodies);
    }
}

#[test]
fn every_template_decodes_as_a_command() {
    // Guards TEMPLATES: with ordinary values each must be a valid command,
    // or the property test above would only exercise the decoder.
    for (tag, fields) in TEMPLATES {
        let body: Map<String, Value> = fields
            .iter()
            .map(|(name, kind)| {
                let v = match kind {
                    Kind::Str => json!("s"),
                    Kind::Int => json!(1),
                    Kind::Map => json!({}),
                    Kind::List | Kind::Offsets | Kind::Bindings => json!([]),
                    Kind::Mechanism => json!("SCRAM-SHA-256"),
                    Kind::Credential => json!({
                        "salt": "00", "iterations": 4096, "stored_key": "00", "server_key": "00",
                    }),
                };
                ((*name).to_string(), v)
            })
            .collect();
        let text = json!({ *tag: body }).to_string();
        assert!(serde_json::from_str::<Command>(&text).is_ok(), "{text}");
    }
}

#[test]
fn the_queries_used_above_decode() {
    // Guards the list in `queries`: a renamed query would silently drop out.
    assert_eq!(queries().len(), 8);
}
