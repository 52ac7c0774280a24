//! The Kafka handlers driven through a real socket with kafka-protocol as
//! the client codec: a broker on `memory://` with a standalone placement
//! node in a temporary directory.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::ResponseError;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, FetchRequest, ListOffsetsRequest, MetadataRequest, ProduceRequest,
    RequestHeader, RequestKind, ResponseHeader, ResponseKind, TopicName,
};
use kafka_protocol::protocol::{Decodable, StrBytes};
use shoal_broker::{Broker, BrokerConfig, batch, flusher};
use shoal_placement::{NodeConfig, PlacementClient, PlacementNode};
use shoal_storage::{Header, ObjectStorage, Record};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Harness {
    broker: Arc<Broker>,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
    _shutdown: tokio::sync::watch::Sender<bool>,
}

async fn start(tail_keep_bytes: usize) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let node = PlacementNode::start(NodeConfig::standalone(
        1,
        dir.path().join("p"),
        "127.0.0.1:1",
    ))
    .await
    .unwrap();
    let mut cfg = BrokerConfig::new(dir.path());
    cfg.tail_keep_bytes = tail_keep_bytes;
    cfg.cache_disk = shoal_wal_cache::CacheSize::Bytes(0);
    let store = ObjectStorage::from_url("memory://").unwrap();
    let broker = Broker::start(cfg, PlacementClient::local(node), store)
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(shoal_broker::kafka::serve(
        listener,
        std::sync::Arc::new(shoal_broker::kafka::KafkaListener::plaintext()),
        broker.clone(),
        rx,
    ));
    Harness {
        broker,
        addr,
        _dir: dir,
        _shutdown: tx,
    }
}

async fn call(conn: &mut TcpStream, key: ApiKey, version: i16, req: RequestKind) -> ResponseKind {
    let mut buf = BytesMut::new();
    buf.put_i32(0);
    let header = RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(7)
        .with_client_id(Some(StrBytes::from_static_str("test")));
    kafka_protocol::protocol::encode_request_header_into_buffer(&mut buf, &header).unwrap();
    req.encode(&mut buf, version).unwrap();
    let len = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    conn.write_all(&buf).await.unwrap();
    let len = conn.read_i32().await.unwrap();
    let mut body = vec![0u8; len as usize];
    conn.read_exact(&mut body).await.unwrap();
    let mut body = Bytes::from(body);
    let h = ResponseHeader::decode(&mut body, key.response_header_version(version)).unwrap();
    assert_eq!(h.correlation_id, 7);
    ResponseKind::decode(key, &mut body, version).unwrap()
}

fn records(values: &[&str]) -> Bytes {
    let rows: Vec<Record> = values
        .iter()
        .enumerate()
        .map(|(i, v)| Record {
            offset: i as i64,
            timestamp_ms: 1_000 + i as i64,
            key: Some(Bytes::from(format!("k{i}"))),
            value: Some(Bytes::from(v.to_string())),
            headers: vec![Header {
                key: "h".into(),
                value: Some(Bytes::from_static(b"x")),
            }],
            producer_id: None,
            producer_epoch: None,
            sequence: None,
        })
        .collect();
    batch::from_rows(&rows).unwrap()
}

fn produce(topic: &str, records: Bytes) -> RequestKind {
    RequestKind::Produce(
        ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(5_000)
            .with_topic_data(vec![
                TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_string(topic.into())))
                    .with_partition_data(vec![
                        PartitionProduceData::default()
                            .with_index(0)
                            .with_records(Some(records)),
                    ]),
            ]),
    )
}

fn fetch(topic: &str, offset: i64) -> RequestKind {
    RequestKind::Fetch(
        FetchRequest::default()
            .with_max_wait_ms(100)
            .with_min_bytes(1)
            .with_max_bytes(1 << 20)
            .with_topics(vec![
                FetchTopic::default()
                    .with_topic(TopicName(StrBytes::from_string(topic.into())))
                    .with_partitions(vec![
                        FetchPartition::default()
                            .with_partition(0)
                            .with_fetch_offset(offset)
                            .with_partition_max_bytes(1 << 20),
                    ]),
            ]),
    )
}

fn produced(r: ResponseKind) -> (i16, i64) {
    let ResponseKind::Produce(p) = r else {
        panic!("not a produce response")
    };
    let pr = &p.responses[0].partition_responses[0];
    (pr.error_code, pr.base_offset)
}

fn fetched_values(r: ResponseKind) -> (i16, Vec<(i64, String)>) {
    let ResponseKind::Fetch(f) = r else {
        panic!("not a fetch response")
    };
    let pd = &f.responses[0].partitions[0];
    let mut out = Vec::new();
    if let Some(bytes) = &pd.records {
        for b in batch::split(bytes.clone()).unwrap() {
            for row in batch::to_rows(&b).unwrap() {
                out.push((
                    row.offset,
                    String::from_utf8(row.value.unwrap().to_vec()).unwrap(),
                ));
            }
        }
    }
    (pd.error_code, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_fetch_and_errors() {
    let h = start(8 << 20).await;
    let mut c = TcpStream::connect(h.addr).await.unwrap();

    let ResponseKind::ApiVersions(v) = call(
        &mut c,
        ApiKey::ApiVersions,
        3,
        RequestKind::ApiVersions(ApiVersionsRequest::default()),
    )
    .await
    else {
        panic!()
    };
    assert!(
        v.api_keys
            .iter()
            .any(|k| k.api_key == ApiKey::Produce as i16)
    );

    // Metadata auto-creates the topic.
    let ResponseKind::Metadata(m) = call(
        &mut c,
        ApiKey::Metadata,
        9,
        RequestKind::Metadata(
            MetadataRequest::default()
                .with_allow_auto_topic_creation(true)
                .with_topics(Some(vec![
                    MetadataRequestTopic::default()
                        .with_name(Some(TopicName(StrBytes::from_static_str("t")))),
                ])),
        ),
    )
    .await
    else {
        panic!()
    };
    assert_eq!(m.topics[0].error_code, 0);
    assert_eq!(m.topics[0].partitions.len(), 1);

    assert_eq!(
        produced(
            call(
                &mut c,
                ApiKey::Produce,
                8,
                produce("t", records(&["a", "b"]))
            )
            .await
        ),
        (0, 0)
    );
    assert_eq!(
        produced(call(&mut c, ApiKey::Produce, 8, produce("t", records(&["c"]))).await),
        (0, 2)
    );

    // A flipped payload byte fails the CRC: CORRUPT_MESSAGE, nothing stored.
    let mut bad = records(&["evil"]).to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0x55;
    let (code, _) =
        produced(call(&mut c, ApiKey::Produce, 8, produce("t", Bytes::from(bad))).await);
    assert_eq!(code, ResponseError::CorruptMessage.code());

    let (code, got) = fetched_values(call(&mut c, ApiKey::Fetch, 11, fetch("t", 1)).await);
    assert_eq!(code, 0);
    let got: Vec<_> = got.into_iter().filter(|(o, _)| *o >= 1).collect();
    assert_eq!(got, vec![(1, "b".to_string()), (2, "c".to_string())]);

    // Past the end: OFFSET_OUT_OF_RANGE.
    let (code, _) = fetched_values(call(&mut c, ApiKey::Fetch, 11, fetch("t", 10)).await);
    assert_eq!(code, ResponseError::OffsetOutOfRange.code());

    let ResponseKind::ListOffsets(l) = call(
        &mut c,
        ApiKey::ListOffsets,
        5,
        RequestKind::ListOffsets(ListOffsetsRequest::default().with_topics(vec![
            ListOffsetsTopic::default()
                .with_name(TopicName(StrBytes::from_static_str("t")))
                .with_partitions(vec![
                    ListOffsetsPartition::default().with_partition_index(0).with_timestamp(-1),
                    ListOffsetsPartition::default().with_partition_index(0).with_timestamp(1_001),
                ]),
        ])),
    )
    .await
    else {
        panic!()
    };
    assert_eq!(l.topics[0].partitions[0].offset, 3);
    // timestamps 1000, 1001 (batch 1) and 1000 (batch 2): first >= 1001 is offset 1
    assert_eq!(l.topics[0].partitions[1].offset, 1);

    // Unknown partition.
    let mut req = produce("t", records(&["x"]));
    if let RequestKind::Produce(p) = &mut req {
        p.topic_data[0].partition_data[0].index = 9;
    }
    let (code, _) = produced(call(&mut c, ApiKey::Produce, 8, req).await);
    assert_eq!(code, ResponseError::UnknownTopicOrPartition.code());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_data_is_served_from_the_copy_cached_at_flush() {
    // Keep nothing flushed in the tail: reads after the flush go to the
    // segment, whose range the flush left in the cache in its original
    // encoding (Parquet decoding is covered by the end-to-end cold reads).
    let h = start(0).await;
    let mut c = TcpStream::connect(h.addr).await.unwrap();
    for (i, vals) in [["a", "b"], ["c", "d"]].iter().enumerate() {
        let (code, base) =
            produced(call(&mut c, ApiKey::Produce, 8, produce("cold", records(vals))).await);
        assert_eq!((code, base), (0, 2 * i as i64));
    }
    let mut id = 0;
    let flushed = flusher::flush_once(&h.broker, &mut id).await.unwrap();
    assert_eq!(flushed, 4);
    let shard = h.broker.stream("cold").unwrap().shard(0).unwrap().clone();
    assert_eq!(shard.committed_offset(), 4);
    let gets = h.broker.store.stats().gets;
    let (code, got) = fetched_values(call(&mut c, ApiKey::Fetch, 11, fetch("cold", 0)).await);
    assert_eq!(code, 0);
    assert_eq!(
        got,
        vec![
            (0, "a".into()),
            (1, "b".into()),
            (2, "c".into()),
            (3, "d".into())
        ]
    );
    assert_eq!(h.broker.metrics.cold_reads.get(), 0);
    assert_eq!(h.broker.store.stats().gets, gets, "no object was read");
    // From the middle of the range too.
    let (_, got) = fetched_values(call(&mut c, ApiKey::Fetch, 11, fetch("cold", 2)).await);
    assert_eq!(got.first(), Some(&(2, "c".into())));
    assert_eq!(h.broker.store.stats().gets, gets);
    // Nothing to flush: no new object.
    assert_eq!(flusher::flush_once(&h.broker, &mut id).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_streams_show_only_committed_records() {
    let h = start(1 << 20).await;
    let config =
        std::collections::BTreeMap::from([("shoal.durability".to_string(), "object".to_string())]);
    h.broker
        .create_stream("obj", 1, config, false)
        .await
        .unwrap();
    let addr = h.addr;
    let producing = tokio::spawn(async move {
        let mut c = TcpStream::connect(addr).await.unwrap();
        produced(
            call(
                &mut c,
                ApiKey::Produce,
                8,
                produce("obj", records(&["x", "y"])),
            )
            .await,
        )
    });
    let shard = h.broker.stream("obj").unwrap().shard(0).unwrap().clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while shard.high_watermark() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the WAL never made it durable"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // In the WAL, not yet in an object: a consumer sees nothing yet.
    let mut c = TcpStream::connect(h.addr).await.unwrap();
    let (code, got) = fetched_values(call(&mut c, ApiKey::Fetch, 11, fetch("obj", 0)).await);
    assert_eq!((code, got.len()), (0, 0));
    let mut id = 0;
    assert_eq!(flusher::flush_once(&h.broker, &mut id).await.unwrap(), 2);
    assert_eq!(producing.await.unwrap(), (0, 0));
    let (code, got) = fetched_values(call(&mut c, ApiKey::Fetch, 11, fetch("obj", 0)).await);
    assert_eq!(code, 0);
    assert_eq!(got, vec![(0, "x".into()), (1, "y".into())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_fills_its_limit_across_segments_and_then_the_tail() {
    // Nothing flushed stays in the tail: three committed ranges, then two
    // records not yet flushed.
    let h = start(0).await;
    let mut c = TcpStream::connect(h.addr).await.unwrap();
    let mut id = 0;
    for vals in [["a", "b"], ["c", "d"], ["e", "f"]] {
        let (code, _) =
            produced(call(&mut c, ApiKey::Produce, 8, produce("span", records(&vals))).await);
        assert_eq!(code, 0);
        assert_eq!(flusher::flush_once(&h.broker, &mut id).await.unwrap(), 2);
    }
    let (code, _) = produced(
        call(
            &mut c,
            ApiKey::Produce,
            8,
            produce("span", records(&["g", "h"])),
        )
        .await,
    );
    assert_eq!(code, 0);
    let shard = h.broker.stream("span").unwrap().shard(0).unwrap().clone();
    assert_eq!(shard.segments().len(), 3);

    let expect: Vec<(i64, String)> = ["a", "b", "c", "d", "e", "f", "g", "h"]
        .iter()
        .enumerate()
        .map(|(i, v)| (i as i64, v.to_string()))
        .collect();
    let (code, got) = fetched_values(call(&mut c, ApiKey::Fetch, 11, fetch("span", 0)).await);
    assert_eq!(code, 0);
    assert_eq!(got, expect, "one answer spans three segments and the tail");
    // From the middle of the second range: its batch, then the rest.
    let (_, got) = fetched_values(call(&mut c, ApiKey::Fetch, 11, fetch("span", 3)).await);
    assert_eq!(got, expect[2..].to_vec());
}
