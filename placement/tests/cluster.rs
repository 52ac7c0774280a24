//! Three placement nodes in one process, each behind its own HTTP router:
//! election, replication through the remote client, and fail-over.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_placement::{
    BrokerInfo, Command, Heartbeat, NodeConfig, PlacementClient, PlacementNode, Query, QueryReply,
    Reply, router,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Member {
    node: Arc<PlacementNode>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
}

impl Member {
    /// Like a crashed process: stop serving, then stop Raft.
    async fn kill(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.server.await;
        self.node.shutdown().await.unwrap();
    }
}

fn create(name: &str) -> Command {
    Command::CreateStream {
        name: name.into(),
        partitions: 2,
        config: BTreeMap::new(),
        id: 42,
        now_ms: 0,
        retention_default: true,
    }
}

fn heartbeat(id: u64) -> Heartbeat {
    Heartbeat {
        info: BrokerInfo {
            id,
            kafka_addr: format!("b{id}:9092"),
            http_addr: format!("b{id}:8080"),
            registered_ms: 0,
            kafka_listeners: Default::default(),
        },
        mqtt_filters: None,
    }
}

fn has_stream(node: &PlacementNode, name: &str) -> bool {
    matches!(
        node.query_local(&Query::GetStream { name: name.into() }),
        QueryReply::Stream { stream: Some(_) }
    )
}

/// Waits until every node names the same leader, one of them; returns it.
async fn agreed_leader(members: &BTreeMap<u64, Member>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let statuses: Vec<_> = members.values().map(|m| m.node.status()).collect();
        let leaders: Vec<_> = statuses.iter().filter(|s| s.is_leader).collect();
        if let [leader] = leaders.as_slice()
            && statuses.iter().all(|s| s.leader_id == Some(leader.node_id))
        {
            return leader.node_id;
        }
        assert!(Instant::now() < deadline, "no agreed leader: {statuses:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_and_fail_over() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut listeners = Vec::new();
    let mut peers = BTreeMap::new();
    for id in 1..=3u64 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        peers.insert(id, listener.local_addr().unwrap().to_string());
        listeners.push((id, listener));
    }

    let mut members = BTreeMap::new();
    for ((id, listener), dir) in listeners.into_iter().zip(&dirs) {
        let cfg = NodeConfig::cluster(id, dir.path(), peers[&id].clone(), peers.clone());
        let node = PlacementNode::start(cfg).await.unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let app = router(node.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        members.insert(
            id,
            Member {
                node,
                stop: Some(stop),
                server,
            },
        );
    }

    let leader = agreed_leader(&members).await;
    let client = PlacementClient::remote(
        peers.values().cloned().collect(),
        &shoal_security::ClientAuth::none(),
    );
    assert!(matches!(
        client.write(create("first")).await.unwrap(),
        Reply::Stream { .. }
    ));
    wait_until("replication to all three", || {
        members.values().all(|m| has_stream(&m.node, "first"))
    })
    .await;

    // A follower refuses the write and names the leader.
    let follower = members.keys().find(|id| **id != leader).copied().unwrap();
    match members[&follower].node.write(create("x")).await {
        Err(shoal_placement::Error::NotLeader {
            leader: Some((id, addr)),
        }) => {
            assert_eq!(id, leader);
            assert_eq!(addr, peers[&leader]);
        }
        other => panic!("expected NotLeader, got {other:?}"),
    }

    for id in [1, 2] {
        client.heartbeat(&heartbeat(id)).await.unwrap();
    }

    members.remove(&leader).unwrap().kill().await;
    let new_leader = agreed_leader(&members).await;
    assert_ne!(new_leader, leader);

    // The new leader has heard from neither broker yet; its first reply
    // still lists both, so no client drops a broker that is alive.
    let reply = members[&new_leader]
        .node
        .heartbeat(heartbeat(1))
        .await
        .unwrap();
    let live: Vec<_> = reply.live.iter().map(|b| b.id).collect();
    assert_eq!(live, [1, 2]);

    // The client finds the new leader by itself; the old write is still there.
    assert!(client.get_stream("first").await.unwrap().is_some());
    assert!(matches!(
        client.write(create("second")).await.unwrap(),
        Reply::Stream { .. }
    ));
    wait_until("replication to the survivors", || {
        members
            .values()
            .all(|m| has_stream(&m.node, "first") && has_stream(&m.node, "second"))
    })
    .await;

    for (_, member) in std::mem::take(&mut members) {
        member.kill().await;
    }
}
