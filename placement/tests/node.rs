//! A standalone placement node: writes, reads, restarts, snapshots, fencing
//! and the HTTP API with the remote client.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use shoal_placement::{
    Command, NodeConfig, NodeStatus, OffsetCommit, PlacementClient, PlacementNode, Query,
    QueryReply, Rejection, Reply, SegmentCommit, ShardCommit, router,
};

fn create(name: &str, partitions: i32) -> Command {
    Command::CreateStream {
        name: name.into(),
        partitions,
        config: BTreeMap::new(),
        // Above u64::MAX on purpose: ids must survive the JSON log and API.
        id: u128::MAX - 7,
        now_ms: 1_000,
        retention_default: true,
    }
}

async fn start(dir: &Path, snapshot_logs: u64) -> Arc<PlacementNode> {
    let mut cfg = NodeConfig::standalone(1, dir, "127.0.0.1:1");
    cfg.snapshot_logs = snapshot_logs;
    PlacementNode::start(cfg).await.unwrap()
}

async fn stream_names(node: &PlacementNode) -> Vec<String> {
    match node.query(Query::ListStreams).await.unwrap() {
        QueryReply::Streams { streams } => streams.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn write_then_query() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), 1000).await;
    let status = node.status();
    assert!(status.is_leader);
    assert_eq!(status.leader_id, Some(1));
    assert_eq!(
        status.membership,
        BTreeMap::from([(1, "127.0.0.1:1".into())])
    );

    let mut version = node.watch_version();
    let before = *version.borrow_and_update();
    let Reply::Stream { stream } = node.write(create("orders", 3)).await.unwrap() else {
        panic!("stream not created");
    };
    assert_eq!(stream.partitions(), 3);
    assert_eq!(stream.id, u128::MAX - 7);
    assert!(version.has_changed().unwrap());
    assert!(*version.borrow() > before);

    let QueryReply::Stream { stream: Some(read) } = node
        .query(Query::GetStream {
            name: "orders".into(),
        })
        .await
        .unwrap()
    else {
        panic!("stream not found");
    };
    assert_eq!(read, stream);
    assert!(matches!(
        node.write(create("orders", 1)).await.unwrap(),
        Reply::Rejected {
            rejection: Rejection::StreamExists { .. }
        }
    ));
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn stale_epoch_commit_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), 1000).await;
    node.write(create("s", 1)).await.unwrap();
    let lease = |broker| Command::AcquireLease {
        stream: "s".into(),
        shard: 0,
        broker,
    };
    let Reply::Lease { epoch: old } = node.write(lease(1)).await.unwrap() else {
        panic!("no lease");
    };
    let Reply::Lease { epoch: new } = node.write(lease(2)).await.unwrap() else {
        panic!("no lease");
    };
    assert!(new > old);
    let commit = |broker, epoch| {
        Command::CommitSegment(SegmentCommit {
            broker,
            object: format!("obj-{broker}"),
            object_size: 100,
            shards: vec![ShardCommit {
                stream: "s".into(),
                shard: 0,
                epoch,
                row_group: 0,
                first_offset: 0,
                last_offset: 9,
                record_count: 10,
                min_timestamp_ms: 0,
                max_timestamp_ms: 0,
                producers: BTreeMap::new(),
                expired_producers: Vec::new(),
                bytes: 50,
            }],
            now_ms: 0,
        })
    };
    let Reply::SegmentCommitted { rejected } = node.write(commit(1, old)).await.unwrap() else {
        panic!("unexpected reply");
    };
    assert!(matches!(
        rejected.as_slice(),
        [r] if matches!(r.rejection, Rejection::StaleEpoch { epoch, current, .. } if epoch == old && current == new)
    ));
    let Reply::SegmentCommitted { rejected } = node.write(commit(2, new)).await.unwrap() else {
        panic!("unexpected reply");
    };
    assert!(rejected.is_empty());
    node.shutdown().await.unwrap();
}

/// Commands that only ever were in the log (no snapshot) survive a restart.
#[tokio::test]
async fn restart_keeps_logged_state() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), 1000).await;
    node.write(create("a", 1)).await.unwrap();
    node.write(create("b", 2)).await.unwrap();
    node.write(Command::DeleteStream { name: "a".into() })
        .await
        .unwrap();
    let version = *node.watch_version().borrow();
    assert_eq!(node.status().last_snapshot, None);
    node.shutdown().await.unwrap();
    drop(node);

    let node = start(dir.path(), 1000).await;
    assert_eq!(stream_names(&node).await, vec!["b".to_string()]);
    assert!(*node.watch_version().borrow() >= version);
    assert!(matches!(
        node.write(create("b", 1)).await.unwrap(),
        Reply::Rejected { .. }
    ));
    node.shutdown().await.unwrap();
}

/// Many writes with a low snapshot threshold: the log is purged behind the
/// snapshots, and a restart rebuilds the state from the last snapshot plus
/// the log after it.
#[tokio::test]
async fn restart_from_snapshot_and_log() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), 10).await;
    node.write(create("s", 4)).await.unwrap();
    let mut last_id = 0;
    for i in 0..53 {
        match node.write(Command::AllocateProducerId).await.unwrap() {
            Reply::ProducerId { id } => last_id = id,
            other => panic!("unexpected {other:?}"),
        }
        if i % 10 == 0 {
            let offsets = vec![OffsetCommit {
                stream: "s".into(),
                shard: i % 4,
                offset: i64::from(i),
                metadata: String::new(),
            }];
            node.write(Command::CommitOffsets {
                group: "g".into(),
                offsets,
                now_ms: 5,
                coordinator_epoch: None,
            })
            .await
            .unwrap();
        }
    }
    assert_eq!(last_id, 53);

    // Snapshots are built and the log purged in the background.
    let mut waited = Duration::ZERO;
    let status = loop {
        let s: NodeStatus = node.status();
        if s.last_snapshot.unwrap_or(0) >= 40 && s.last_purged.is_some() {
            break s;
        }
        assert!(waited < Duration::from_secs(10), "no snapshot: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    };
    let applied = status.last_applied.unwrap();
    assert!(
        applied - status.last_purged.unwrap() <= 25,
        "log not bounded: {status:?}"
    );
    let offsets_before = node
        .query(Query::GroupOffsets { group: "g".into() })
        .await
        .unwrap();
    node.shutdown().await.unwrap();
    drop(node);

    let node = start(dir.path(), 10).await;
    assert_eq!(
        node.query(Query::GroupOffsets { group: "g".into() })
            .await
            .unwrap(),
        offsets_before
    );
    assert_eq!(
        node.write(Command::AllocateProducerId).await.unwrap(),
        Reply::ProducerId { id: 54 }
    );
    assert_eq!(stream_names(&node).await, vec!["s".to_string()]);
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn http_api_and_remote_client() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let node = PlacementNode::start(NodeConfig::standalone(1, dir.path(), addr.clone()))
        .await
        .unwrap();
    let server = tokio::spawn(axum::serve(listener, router(node.clone())).into_future());

    let client = PlacementClient::remote(vec![addr.clone()], &shoal_security::ClientAuth::none());
    let Reply::Stream { stream } = client.write(create("t", 2)).await.unwrap() else {
        panic!("stream not created");
    };
    assert_eq!(stream.id, u128::MAX - 7);
    assert_eq!(client.get_stream("t").await.unwrap(), Some(stream.clone()));
    assert_eq!(client.get_stream("nope").await.unwrap(), None);
    assert_eq!(client.list_streams().await.unwrap(), vec![stream]);

    client
        .write(Command::CommitOffsets {
            group: "g1".into(),
            offsets: vec![OffsetCommit {
                stream: "t".into(),
                shard: 1,
                offset: 77,
                metadata: "m".into(),
            }],
            now_ms: 9,
            coordinator_epoch: None,
        })
        .await
        .unwrap();
    assert_eq!(client.list_groups().await.unwrap(), vec!["g1".to_string()]);
    let offsets = client.group_offsets("g1").await.unwrap();
    assert_eq!(offsets["t"][&1].offset, 77);

    // The local client answers the same.
    let local = PlacementClient::local(node.clone());
    assert_eq!(local.group_offsets("g1").await.unwrap(), offsets);

    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let status: NodeStatus = http
        .get(format!("http://{addr}/placement/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(status.is_leader);
    assert_eq!(status.membership[&1], addr);

    // Garbage is refused without harm.
    let res = http
        .post(format!("http://{addr}/placement/v1/write"))
        .header("content-type", "application/json")
        .body("{\"type\":\"no_such_command\"}")
        .send()
        .await
        .unwrap();
    assert!(res.status().is_client_error());
    let body: serde_json::Value = res.json().await.unwrap();
    assert!(body["error"].is_string(), "{body}");

    server.abort();
    node.shutdown().await.unwrap();
}

async fn start_on_bucket(dir: &Path, store: &shoal_storage::ObjectStorage) -> Arc<PlacementNode> {
    let mut cfg = NodeConfig::standalone(1, dir, "127.0.0.1:1");
    cfg.bucket = Some(shoal_placement::BucketConfig::new(
        store.clone(),
        "holder-a",
    ));
    PlacementNode::start(cfg).await.unwrap()
}

/// A write whose caller stops polling it halfway (a `select!` arm busy with
/// something else) must not hold up other writes on a node that keeps its
/// state in a bucket; and the abandoned command, once applied, still
/// reaches the bucket copy.
#[tokio::test]
async fn an_unpolled_write_holds_up_no_other_write_on_a_bucket() {
    use futures::FutureExt;
    let dir = tempfile::tempdir().unwrap();
    let store = shoal_storage::ObjectStorage::from_url("memory:///").unwrap();
    let node = start_on_bucket(dir.path(), &store).await;

    let mut stalled = Box::pin(node.write(create("stalled", 1)));
    // One poll: the write is under way, and then nobody polls it again.
    assert!((&mut stalled).now_or_never().is_none());
    let other = tokio::time::timeout(Duration::from_secs(10), node.write(create("other", 1)))
        .await
        .expect("a second write finished while the first was not polled");
    assert!(matches!(other.unwrap(), Reply::Stream { .. }));
    drop(stalled);

    // Once the node waits for the bucket, both commands are there: a new
    // node on an empty disk restores them from the bucket alone.
    node.write(create("last", 1)).await.unwrap();
    node.shutdown().await.unwrap();
    drop(node);
    let fresh = tempfile::tempdir().unwrap();
    let node = start_on_bucket(fresh.path(), &store).await;
    let mut names = stream_names(&node).await;
    names.sort();
    assert_eq!(names, ["last", "other", "stalled"]);
}
