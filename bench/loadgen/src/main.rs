//! A paced Kafka produce load generator with client-side latency
//! percentiles, light enough to share two cores with the broker.
//!
//! Open loop: record `k` is due at `start + k / rate`. Every `--linger-ms`
//! the records due so far go out in one Produce request (one batch per
//! partition, round-robin), pipelined up to `--max-in-flight` requests on
//! one connection, acks=all. A record's latency runs from its due time to
//! the response that acknowledged it, so time spent queued behind a slow
//! response counts (no coordinated omission). The first `--warmup-seconds`
//! are sent but not measured. Prints one JSON line.
//!
//! It speaks to one broker (standalone): every partition must be led by
//! the bootstrap broker.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use clap::Parser;
use indexmap::IndexMap;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, CreateTopicsRequest, ProduceRequest, RequestHeader, ResponseHeader, ResponseKind,
    TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore};

#[derive(Parser, Debug, Clone)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9092")]
    bootstrap: String,
    /// Topic (created with --partitions if it does not exist).
    #[arg(long)]
    topic: Option<String>,
    #[arg(long, default_value_t = 1)]
    partitions: i32,
    /// Records per second (all partitions together).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Instead of producing: read --topic's --partitions from offset 0 to
    /// their high watermarks as fast as the broker answers (one Fetch in
    /// flight, like a consumer), and print bytes, records and MB/s. Batch
    /// headers are read, records are not decoded.
    #[arg(long)]
    consume: bool,
    /// Instead of producing: follow --topic's --partitions from their high
    /// watermarks for --seconds and print produce-to-consume latency
    /// percentiles (records stamped by a producing loadgen on this machine).
    /// Prints a `ready` line once it is reading.
    #[arg(long)]
    follow: bool,
    /// Per-response and per-partition limits of --consume's fetches.
    #[arg(long, default_value_t = 64 << 20)]
    fetch_max_bytes: i32,
    #[arg(long, default_value_t = 16 << 20)]
    partition_max_bytes: i32,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    #[arg(long, default_value_t = 5)]
    warmup_seconds: u64,
    #[arg(long, default_value_t = 1024)]
    record_size: usize,
    /// How often the records due go out (librdkafka's linger.ms).
    #[arg(long, default_value_t = 1)]
    linger_ms: u64,
    #[arg(long, default_value_t = 5)]
    max_in_flight: usize,
    /// Largest batch per partition (librdkafka's batch.size); records due
    /// beyond it wait for the next request.
    #[arg(long, default_value_t = 1 << 20)]
    max_batch_bytes: usize,
}

type Result<T> = std::result::Result<T, String>;

const PRODUCE_VERSION: i16 = 9;

async fn call(
    conn: &mut TcpStream,
    key: ApiKey,
    version: i16,
    body: &[u8],
    cid: i32,
) -> Result<()> {
    let mut buf = BytesMut::new();
    let header = RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(cid)
        .with_client_id(Some(StrBytes::from_static_str("shoal-loadgen")));
    header
        .encode(&mut buf, key.request_header_version(version))
        .map_err(|e| e.to_string())?;
    buf.extend_from_slice(body);
    let len = i32::try_from(buf.len()).map_err(|e| e.to_string())?;
    conn.write_all(&len.to_be_bytes())
        .await
        .map_err(|e| e.to_string())?;
    conn.write_all(&buf).await.map_err(|e| e.to_string())
}

async fn read_response(
    rd: &mut (impl AsyncReadExt + Unpin),
    key: ApiKey,
    version: i16,
) -> Result<ResponseKind> {
    let len = rd.read_i32().await.map_err(|e| e.to_string())?;
    let len = usize::try_from(len).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; len];
    rd.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    let mut body = Bytes::from(body);
    ResponseHeader::decode(&mut body, key.response_header_version(version))
        .map_err(|e| e.to_string())?;
    ResponseKind::decode(key, &mut body, version).map_err(|e| e.to_string())
}

/// Like [`read_response`], into `buf`, which the caller keeps: a consumer
/// reading 64 MiB responses would otherwise fault in fresh pages for each.
async fn read_response_into(
    rd: &mut (impl AsyncReadExt + Unpin),
    buf: &mut BytesMut,
    key: ApiKey,
    version: i16,
) -> Result<ResponseKind> {
    let len = rd.read_i32().await.map_err(|e| e.to_string())?;
    let len = usize::try_from(len).map_err(|e| e.to_string())?;
    buf.clear();
    buf.reserve(len);
    let mut body = rd.take(len as u64);
    while buf.len() < len {
        if body.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("connection closed mid-response".into());
        }
    }
    let mut body = buf.split().freeze();
    ResponseHeader::decode(&mut body, key.response_header_version(version))
        .map_err(|e| e.to_string())?;
    ResponseKind::decode(key, &mut body, version).map_err(|e| e.to_string())
}

async fn create_topic(addr: &str, topic: &str, partitions: i32) -> Result<()> {
    let mut conn = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let req = CreateTopicsRequest::default()
        .with_topics(vec![
            CreatableTopic::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_num_partitions(partitions)
                .with_replication_factor(1),
        ])
        .with_timeout_ms(30_000);
    let mut body = BytesMut::new();
    req.encode(&mut body, 5).map_err(|e| e.to_string())?;
    call(&mut conn, ApiKey::CreateTopics, 5, &body, 1).await?;
    match read_response(&mut conn, ApiKey::CreateTopics, 5).await? {
        ResponseKind::CreateTopics(r) => match r.topics.first().map(|t| t.error_code) {
            // 36: TOPIC_ALREADY_EXISTS
            Some(0) | Some(36) => Ok(()),
            other => Err(format!("CreateTopics answered {other:?}")),
        },
        other => Err(format!("unexpected response {other:?}")),
    }
}

/// Incompressible bytes to cut record values from (xorshift64*), so
/// neither the WAL nor Parquet's zstd sees data easier than real payloads.
fn random_pool(len: usize) -> Bytes {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// One batch of `n` records, each a different slice of `pool`.
fn batch(n: usize, pool: &Bytes, size: usize, first: u64, now_ms: i64) -> Result<Bytes> {
    let span = pool.len().saturating_sub(size).max(1) as u64;
    let value = |i: usize| {
        let at = ((first + i as u64).wrapping_mul(7919) % span) as usize;
        pool.slice(at..at + size.min(pool.len()))
    };
    let records: Vec<Record> = (0..n)
        .map(|i| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            // The encoder starts a new batch where offset - sequence
            // changes; -1 for the first record is "no sequence".
            sequence: i as i32 - 1,
            timestamp: now_ms,
            key: None,
            value: Some(value(i)),
            headers: IndexMap::new(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(buf.freeze())
}

/// The record indices a request carried.
struct InFlight {
    first: u64,
    end: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    match run(args).await {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

/// A batch's header as a consumer needs it.
struct BatchSeen {
    last_offset: i64,
    records: u64,
    bytes: u64,
    /// The batch's first timestamp (ms): loadgen stamps a batch's records
    /// with the time it was sent.
    first_timestamp_ms: i64,
}

const FETCH_VERSION: i16 = 12;

/// One Fetch (v12, sessionless) of every partition from `next`; returns
/// each answered partition's high watermark and the whole batches it
/// carried. Batch headers are read, records are not decoded.
async fn fetch_batches(
    conn: &mut TcpStream,
    topic: &str,
    next: &[i64],
    args: &Args,
    max_wait_ms: i32,
    cid: i32,
    buf: &mut BytesMut,
) -> Result<Vec<(usize, i64, Vec<BatchSeen>)>> {
    use kafka_protocol::messages::FetchRequest;
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    let parts = (0..next.len())
        .map(|p| {
            FetchPartition::default()
                .with_partition(p as i32)
                .with_fetch_offset(next[p])
                .with_partition_max_bytes(args.partition_max_bytes)
        })
        .collect();
    let req = FetchRequest::default()
        .with_replica_id(kafka_protocol::messages::BrokerId(-1))
        .with_max_wait_ms(max_wait_ms)
        .with_min_bytes(1)
        .with_max_bytes(args.fetch_max_bytes)
        .with_session_epoch(-1)
        .with_topics(vec![
            FetchTopic::default()
                .with_topic(TopicName(StrBytes::from_string(topic.to_owned())))
                .with_partitions(parts),
        ]);
    let mut body = BytesMut::new();
    req.encode(&mut body, FETCH_VERSION)
        .map_err(|e| e.to_string())?;
    call(conn, ApiKey::Fetch, FETCH_VERSION, &body, cid).await?;
    let ResponseKind::Fetch(resp) =
        read_response_into(conn, buf, ApiKey::Fetch, FETCH_VERSION).await?
    else {
        return Err("not a fetch response".into());
    };
    let short = |_| "short batch header".to_string();
    let mut out = Vec::new();
    for t in resp.responses {
        for pd in t.partitions {
            if pd.error_code != 0 {
                return Err(format!(
                    "partition {}: error {}",
                    pd.partition_index, pd.error_code
                ));
            }
            let i = usize::try_from(pd.partition_index)
                .ok()
                .filter(|i| *i < next.len())
                .ok_or_else(|| format!("unexpected partition {}", pd.partition_index))?;
            let mut seen = Vec::new();
            let data = pd.records.unwrap_or_default();
            let mut pos = 0usize;
            while pos + 61 <= data.len() {
                let at = |from: usize, n: usize| &data[pos + from..pos + from + n];
                let base = i64::from_be_bytes(at(0, 8).try_into().map_err(short)?);
                let len = i32::from_be_bytes(at(8, 4).try_into().map_err(short)?);
                let size = 12 + usize::try_from(len).map_err(|e| e.to_string())?;
                if pos + size > data.len() {
                    break;
                }
                let delta = i32::from_be_bytes(at(23, 4).try_into().map_err(short)?);
                let first_ts = i64::from_be_bytes(at(27, 8).try_into().map_err(short)?);
                let count = i32::from_be_bytes(at(57, 4).try_into().map_err(short)?);
                seen.push(BatchSeen {
                    last_offset: base + i64::from(delta),
                    records: u64::try_from(count).unwrap_or(0),
                    bytes: size as u64,
                    first_timestamp_ms: first_ts,
                });
                pos += size;
            }
            out.push((i, pd.high_watermark, seen));
        }
    }
    Ok(out)
}

/// --consume: every partition from 0 to its high watermark.
async fn consume(args: &Args) -> Result<String> {
    let topic = args.topic.clone().ok_or("--consume needs --topic")?;
    let mut conn = TcpStream::connect(&args.bootstrap)
        .await
        .map_err(|e| e.to_string())?;
    let mut next: Vec<i64> = vec![0; usize::try_from(args.partitions).map_err(|e| e.to_string())?];
    let mut end: Vec<Option<i64>> = vec![None; next.len()];
    let (mut bytes, mut records, mut requests) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    let mut cid = 0;
    let mut buf = BytesMut::new();
    while end.iter().zip(&next).any(|(e, n)| e.is_none_or(|e| *n < e)) {
        cid += 1;
        requests += 1;
        for (i, hw, seen) in
            fetch_batches(&mut conn, &topic, &next, args, 500, cid, &mut buf).await?
        {
            end[i] = Some(hw);
            for b in seen {
                if b.last_offset >= next[i] {
                    next[i] = b.last_offset + 1;
                    bytes += b.bytes;
                    records += b.records;
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "mode": "consume",
        "topic": topic,
        "bytes": bytes,
        "records": records,
        "requests": requests,
        "seconds": secs,
        "mb_s": bytes as f64 / secs / 1e6,
    })
    .to_string())
}

/// --follow: from the high watermarks on, for --seconds, like a consumer
/// keeping up (one Fetch in flight, min_bytes 1, max_wait 100 ms); every
/// record's latency is the time it arrived minus the time its batch was
/// sent (both this machine's clock, millisecond resolution). Records sent
/// in the first --warmup-seconds after it is ready are read, not counted.
async fn follow(args: &Args) -> Result<String> {
    let topic = args.topic.clone().ok_or("--follow needs --topic")?;
    let mut conn = TcpStream::connect(&args.bootstrap)
        .await
        .map_err(|e| e.to_string())?;
    conn.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut next: Vec<i64> = vec![0; usize::try_from(args.partitions).map_err(|e| e.to_string())?];
    // A fetch with no wait tells the high watermarks; reading starts there.
    let mut cid = 1;
    let mut buf = BytesMut::new();
    for (i, hw, _) in fetch_batches(&mut conn, &topic, &next, args, 0, cid, &mut buf).await? {
        next[i] = hw;
    }
    println!("{}", serde_json::json!({"mode": "follow", "ready": true}));
    let counted_from_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
        + i64::try_from(args.warmup_seconds * 1000).unwrap_or(i64::MAX);
    let mut lat: Vec<(f32, u64)> = Vec::new();
    let (mut records, mut requests) = (0u64, 0u64);
    let until = Instant::now() + Duration::from_secs(args.seconds);
    while Instant::now() < until {
        cid += 1;
        requests += 1;
        let answered = fetch_batches(&mut conn, &topic, &next, args, 100, cid, &mut buf).await?;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3);
        for (i, _, seen) in answered {
            for b in seen {
                if b.last_offset >= next[i] {
                    next[i] = b.last_offset + 1;
                    if b.first_timestamp_ms >= counted_from_ms {
                        records += b.records;
                        lat.push(((now_ms - b.first_timestamp_ms as f64) as f32, b.records));
                    }
                }
            }
        }
    }
    lat.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: u64 = lat.iter().map(|l| l.1).sum();
    let pct = |q: f64| {
        let want = (total as f64 * q).ceil() as u64;
        let mut seen = 0u64;
        for (l, n) in &lat {
            seen += n;
            if seen >= want.max(1) {
                return (f64::from(*l) * 10.0).round() / 10.0;
            }
        }
        f64::NAN
    };
    Ok(serde_json::json!({
        "mode": "follow",
        "topic": topic,
        "records": records,
        "requests": requests,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "p999_ms": pct(0.999),
        "max_ms": pct(1.0),
    })
    .to_string())
}

async fn run(args: Args) -> Result<String> {
    if args.consume {
        return consume(&args).await;
    }
    if args.follow {
        return follow(&args).await;
    }
    if args.rate == 0 {
        return Err("--rate is required to produce".into());
    }
    let topic = args.topic.clone().unwrap_or_else(|| {
        format!(
            "loadgen-{}p-{}",
            args.partitions,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        )
    });
    create_topic(&args.bootstrap, &topic, args.partitions).await?;
    let conn = TcpStream::connect(&args.bootstrap)
        .await
        .map_err(|e| e.to_string())?;
    conn.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut rd, mut wr) = conn.into_split();

    let rate = args.rate.max(1) as f64;
    let total = args.rate * (args.seconds + args.warmup_seconds);
    let warm = args.rate * args.warmup_seconds;
    let start = Instant::now();
    let due = move |k: u64| start + Duration::from_secs_f64(k as f64 / rate);
    let pool = random_pool(16 << 20);
    let slots = Arc::new(Semaphore::new(args.max_in_flight));
    let pending: Arc<Mutex<VecDeque<InFlight>>> = Arc::default();

    // Responses come back in order: match them to what each request carried.
    let reader = {
        let (slots, pending) = (slots.clone(), pending.clone());
        tokio::spawn(async move {
            let mut lat: Vec<f32> = Vec::with_capacity(total as usize);
            let mut errors = 0u64;
            let mut codes = std::collections::BTreeMap::<i16, u64>::new();
            let mut acked = 0u64;
            while acked < total {
                let resp = read_response(&mut rd, ApiKey::Produce, PRODUCE_VERSION).await?;
                let now = Instant::now();
                let Some(req) = pending.lock().await.pop_front() else {
                    return Err("a response nobody waited for".to_string());
                };
                slots.add_permits(1);
                if let ResponseKind::Produce(r) = resp {
                    for p in r
                        .responses
                        .iter()
                        .flat_map(|t| t.partition_responses.iter())
                    {
                        if p.error_code != 0 {
                            errors += 1;
                            *codes.entry(p.error_code).or_default() += 1;
                        }
                    }
                }
                for k in req.first..req.end {
                    if k >= warm {
                        lat.push(now.saturating_duration_since(due(k)).as_secs_f32());
                    }
                }
                acked = req.end;
            }
            Ok::<_, String>((lat, errors, codes))
        })
    };

    let mut sent = 0u64;
    let mut cid = 0i32;
    let mut tick = tokio::time::interval(Duration::from_millis(args.linger_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while sent < total {
        tick.tick().await;
        let now = Instant::now();
        if sent >= total || due(sent) > now {
            continue;
        }
        let mut upto = sent;
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        permit.forget();
        // Records queued while waiting for a slot go out too, up to a
        // batch per partition.
        let parts = args.partitions.max(1) as usize;
        let cap = (args.max_batch_bytes / (args.record_size + 16)).max(1) as u64 * parts as u64;
        let now = Instant::now();
        while upto < total && due(upto) <= now && upto - sent < cap {
            upto += 1;
        }
        let n = (upto - sent) as usize;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut data = Vec::new();
        for p in 0..parts {
            let count = n / parts + usize::from(p < n % parts);
            if count > 0 {
                data.push(
                    PartitionProduceData::default()
                        .with_index(((sent as usize + p) % parts) as i32)
                        .with_records(Some(batch(
                            count,
                            &pool,
                            args.record_size,
                            sent + p as u64,
                            now_ms,
                        )?)),
                );
            }
        }
        let req = ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![
                TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_string(topic.clone())))
                    .with_partition_data(data),
            ]);
        let mut body = BytesMut::new();
        req.encode(&mut body, PRODUCE_VERSION)
            .map_err(|e| e.to_string())?;
        pending.lock().await.push_back(InFlight {
            first: sent,
            end: upto,
        });
        cid = cid.wrapping_add(1);
        let mut framed = BytesMut::new();
        let header = RequestHeader::default()
            .with_request_api_key(ApiKey::Produce as i16)
            .with_request_api_version(PRODUCE_VERSION)
            .with_correlation_id(cid)
            .with_client_id(Some(StrBytes::from_static_str("shoal-loadgen")));
        header
            .encode(
                &mut framed,
                ApiKey::Produce.request_header_version(PRODUCE_VERSION),
            )
            .map_err(|e| e.to_string())?;
        framed.extend_from_slice(&body);
        let len = i32::try_from(framed.len()).map_err(|e| e.to_string())?;
        wr.write_all(&len.to_be_bytes())
            .await
            .map_err(|e| e.to_string())?;
        wr.write_all(&framed).await.map_err(|e| e.to_string())?;
        sent = upto;
    }
    let (mut lat, errors, codes) = reader.await.map_err(|e| e.to_string())??;
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_by(f32::total_cmp);
    let pct = |q: f64| {
        let i = ((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1));
        lat.get(i).map_or(f64::NAN, |v| f64::from(*v) * 1e3)
    };
    let line = serde_json::json!({
        "topic": topic,
        "partitions": args.partitions,
        "target_rate": args.rate,
        "records": total,
        "errors": errors,
        "error_codes": codes,
        "mb_per_s": (total as f64 * args.record_size as f64 / elapsed / 1e6 * 10.0).round() / 10.0,
        "elapsed_s": (elapsed * 100.0).round() / 100.0,
        "p50_ms": (pct(0.50) * 100.0).round() / 100.0,
        "p90_ms": (pct(0.90) * 100.0).round() / 100.0,
        "p99_ms": (pct(0.99) * 100.0).round() / 100.0,
        "p999_ms": (pct(0.999) * 100.0).round() / 100.0,
        "max_ms": (pct(1.0) * 100.0).round() / 100.0,
    });
    Ok(line.to_string())
}
