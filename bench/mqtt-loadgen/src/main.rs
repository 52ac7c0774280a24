//! An MQTT load generator: many connections from one process, for
//! comparing brokers on the same machine.
//!
//! `pubsub`: subscribers connect and subscribe first, then publishers send
//! as fast as the broker takes them (QoS 0: paced only by TCP; QoS 1/2: up
//! to `--inflight` unacknowledged each) for `--seconds`. Every payload
//! starts with the send time, so subscribers measure publish-to-delivery
//! latency. `idle`: open `--connections` connections and hold them, for
//! memory per connection. Prints one JSON line.
//!
//! The hot path (PUBLISH out, PUBLISH/PUBACK in) is encoded and parsed by
//! hand so that the generator is not what limits the measurement; CONNECT
//! and SUBSCRIBE use the `mqtt5-protocol` codec.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use clap::{Parser, ValueEnum};
use mqtt5_protocol::packet::MqttPacket;
use mqtt5_protocol::packet::connect::ConnectPacket;
use mqtt5_protocol::packet::subscribe::SubscribePacket;
use mqtt5_protocol::types::{ConnectOptions, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Pubsub,
    Idle,
}

#[derive(Parser, Debug, Clone)]
struct Args {
    #[arg(long, value_enum, default_value = "pubsub")]
    mode: Mode,
    #[arg(long, default_value = "127.0.0.1:1883")]
    addr: String,
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    #[arg(long, default_value_t = 1)]
    subscribers: usize,
    /// Publisher i sends to `{topic}/{i}`; subscribers take `{topic}/#`.
    #[arg(long, default_value = "bench")]
    topic: String,
    #[arg(long, default_value_t = 0)]
    qos: u8,
    /// Payload bytes (at least 8: the send time).
    #[arg(long, default_value_t = 16)]
    payload: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Messages per second per publisher (0: as fast as the broker takes
    /// them). A paced run measures latency below saturation.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Unacknowledged QoS 1 publishes per publisher.
    #[arg(long, default_value_t = 64)]
    inflight: usize,
    /// MQTT protocol level: 4 (3.1.1) or 5.
    #[arg(long, default_value_t = 4)]
    version: u8,
    /// `idle`: connections to open and hold.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// `idle`: seconds to hold them once all are open.
    #[arg(long, default_value_t = 10)]
    hold_seconds: u64,
    /// `idle`: a file created once all connections are open (the harness
    /// measures memory then).
    #[arg(long)]
    ready_file: Option<std::path::PathBuf>,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

fn encode(p: &impl MqttPacket) -> Result<BytesMut, Error> {
    let mut b = BytesMut::new();
    p.encode(&mut b)?;
    Ok(b)
}

/// Read one whole packet: (first byte, body).
async fn read_packet(
    sock: &mut (impl AsyncReadExt + Unpin),
    buf: &mut BytesMut,
) -> Result<(u8, BytesMut), Error> {
    loop {
        if let Some(p) = cut(buf)? {
            return Ok(p);
        }
        if sock.read_buf(buf).await? == 0 {
            return Err("connection closed".into());
        }
    }
}

/// The next whole packet in `buf`, if it is all there.
fn cut(buf: &mut BytesMut) -> Result<Option<(u8, BytesMut)>, Error> {
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err("bad remaining length".into());
        }
    }
    if buf.len() < i + len {
        return Ok(None);
    }
    let first = buf[0];
    buf.advance(i);
    Ok(Some((first, buf.split_to(len))))
}

fn put_varint(b: &mut BytesMut, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        b.put_u8(byte);
        if n == 0 {
            break;
        }
    }
}

fn publish(out: &mut BytesMut, version: u8, topic: &str, qos: u8, pid: u16, payload: &[u8]) {
    let mut len = 2 + topic.len() + payload.len();
    if qos > 0 {
        len += 2;
    }
    if version == 5 {
        len += 1;
    }
    out.put_u8(0x30 | (qos << 1));
    put_varint(out, len);
    out.put_u16(topic.len() as u16);
    out.put_slice(topic.as_bytes());
    if qos > 0 {
        out.put_u16(pid);
    }
    if version == 5 {
        out.put_u8(0);
    }
    out.put_slice(payload);
}

/// The payload of a PUBLISH body, and its packet id.
fn publish_payload(first: u8, mut body: BytesMut, version: u8) -> Option<(BytesMut, Option<u16>)> {
    let qos = (first >> 1) & 3;
    if body.len() < 2 {
        return None;
    }
    let tl = usize::from(body.get_u16());
    if body.len() < tl {
        return None;
    }
    body.advance(tl);
    let pid = if qos > 0 {
        if body.len() < 2 {
            return None;
        }
        Some(body.get_u16())
    } else {
        None
    };
    if version == 5 {
        let mut n = 0usize;
        let mut shift = 0;
        loop {
            if body.is_empty() {
                return None;
            }
            let b = body.get_u8();
            n |= usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        if body.len() < n {
            return None;
        }
        body.advance(n);
    }
    Some((body, pid))
}

async fn connect(args: &Args, client_id: &str) -> Result<(TcpStream, BytesMut), Error> {
    let mut sock = TcpStream::connect(&args.addr).await?;
    sock.set_nodelay(true)?;
    let mut opts = ConnectOptions::new(client_id);
    opts.keep_alive = Duration::from_secs(600);
    opts.clean_start = true;
    let c = if args.version == 5 {
        ConnectPacket::new(opts)
    } else {
        ConnectPacket::new_v311(opts)
    };
    sock.write_all(&encode(&c)?).await?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let (first, body) = read_packet(&mut sock, &mut buf).await?;
    if first >> 4 != 2 || body.get(1).copied().unwrap_or(1) != 0 {
        return Err(format!("CONNACK refused: {first:#x} {:?}", &body[..]).into());
    }
    Ok((sock, buf))
}

struct Stats {
    sent: AtomicU64,
    received: AtomicU64,
    latencies: Mutex<Vec<u32>>,
}

fn now_ns(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

async fn subscriber(
    args: Args,
    i: usize,
    start: Instant,
    stats: Arc<Stats>,
    measuring: Arc<AtomicBool>,
    ready: tokio::sync::mpsc::Sender<()>,
) -> Result<(), Error> {
    let (sock, mut buf) = connect(&args, &format!("bench-sub-{i}")).await?;
    let (mut rd, mut wr) = sock.into_split();
    let filter = format!("{}/#", args.topic);
    let s = if args.version == 5 {
        SubscribePacket::new(1)
    } else {
        SubscribePacket::new_v311(1)
    }
    .add_filter(filter, qos(args.qos));
    wr.write_all(&encode(&s)?).await?;
    let (first, _) = read_packet(&mut rd, &mut buf).await?;
    if first >> 4 != 9 {
        return Err("no SUBACK".into());
    }
    let _ = ready.send(()).await;
    let mut lat = Vec::new();
    let mut acks = BytesMut::new();
    loop {
        // Everything buffered, then one write of the acknowledgements.
        let got = rd.read_buf(&mut buf).await?;
        if got == 0 {
            break;
        }
        while let Some((first, body)) = cut(&mut buf)? {
            if first >> 4 != 3 {
                continue;
            }
            let Some((payload, pid)) = publish_payload(first, body, args.version) else {
                continue;
            };
            if let Some(pid) = pid {
                // PUBACK, or PUBREC for QoS 2 (PUBREL answered below).
                acks.put_u8(if (first >> 1) & 3 == 2 { 0x50 } else { 0x40 });
                acks.put_u8(2);
                acks.put_u16(pid);
            }
            if measuring.load(Ordering::Relaxed) && payload.len() >= 8 {
                let sent = u64::from_be_bytes(payload[..8].try_into().unwrap_or([0; 8]));
                let us = now_ns(start).saturating_sub(sent) / 1000;
                lat.push(u32::try_from(us).unwrap_or(u32::MAX));
                stats.received.fetch_add(1, Ordering::Relaxed);
            }
        }
        if lat.len() >= 1024 {
            // Shared in chunks: the task is aborted at the end.
            stats.latencies.lock().await.append(&mut lat);
        }
        if !acks.is_empty() {
            wr.write_all(&acks).await?;
            acks.clear();
        }
        if !measuring.load(Ordering::Relaxed) && stats.sent.load(Ordering::Relaxed) > 0 {
            break;
        }
    }
    stats.latencies.lock().await.extend(lat);
    Ok(())
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

async fn publisher(
    args: Args,
    i: usize,
    start: Instant,
    stats: Arc<Stats>,
    deadline: Instant,
) -> Result<(), Error> {
    let (sock, mut buf) = connect(&args, &format!("bench-pub-{i}")).await?;
    let (mut rd, mut wr) = sock.into_split();
    let topic = format!("{}/{i}", args.topic);
    let mut payload = vec![0u8; args.payload.max(8)];
    let mut out = BytesMut::with_capacity(256 * 1024);
    let mut pid: u16 = 0;
    let mut unacked = 0usize;
    let mut sent = 0u64;
    let began = Instant::now();
    while Instant::now() < deadline {
        // A burst of publishes per write: as many as the window allows, or
        // (paced) as many as are due.
        let mut burst = if args.qos == 0 {
            64
        } else {
            args.inflight - unacked
        };
        if args.rate > 0 {
            let due = (began.elapsed().as_secs_f64() * args.rate as f64) as u64;
            if due <= sent {
                tokio::time::sleep(Duration::from_micros(500)).await;
                if args.qos == 0 || unacked == 0 {
                    continue;
                }
                burst = 0;
            } else {
                burst = burst.min(usize::try_from(due - sent).unwrap_or(usize::MAX));
            }
        }
        for _ in 0..burst {
            payload[..8].copy_from_slice(&now_ns(start).to_be_bytes());
            pid = pid.wrapping_add(1).max(1);
            publish(&mut out, args.version, &topic, args.qos, pid, &payload);
            sent += 1;
        }
        unacked += if args.qos == 0 { 0 } else { burst };
        if !out.is_empty() {
            wr.write_all(&out).await?;
            out.clear();
        }
        if args.qos > 0 {
            // Wait for at least one acknowledgement.
            let n = rd.read_buf(&mut buf).await?;
            if n == 0 {
                return Err("connection closed".into());
            }
            while let Some((first, body)) = cut(&mut buf)? {
                match first >> 4 {
                    4 | 7 => unacked = unacked.saturating_sub(1),
                    5 => {
                        // PUBREC: release.
                        out.put_u8(0x62);
                        out.put_u8(2);
                        out.put_slice(&body[..2.min(body.len())]);
                    }
                    _ => {}
                }
            }
        }
    }
    stats.sent.fetch_add(sent, Ordering::Relaxed);
    Ok(())
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn pubsub(args: Args) -> Result<(), Error> {
    let start = Instant::now();
    let stats = Arc::new(Stats {
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
        latencies: Mutex::new(Vec::new()),
    });
    let measuring = Arc::new(AtomicBool::new(true));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(args.subscribers.max(1));
    let mut subs = Vec::new();
    for i in 0..args.subscribers {
        subs.push(tokio::spawn(subscriber(
            args.clone(),
            i,
            start,
            stats.clone(),
            measuring.clone(),
            ready_tx.clone(),
        )));
    }
    for _ in 0..args.subscribers {
        ready_rx.recv().await.ok_or("a subscriber failed")?;
    }
    let began = Instant::now();
    let deadline = began + Duration::from_secs(args.seconds);
    let mut pubs = Vec::new();
    for i in 0..args.publishers {
        pubs.push(tokio::spawn(publisher(
            args.clone(),
            i,
            start,
            stats.clone(),
            deadline,
        )));
    }
    for p in pubs {
        p.await??;
    }
    // Deliveries still on their way count, for a short while.
    let sent = stats.sent.load(Ordering::Relaxed);
    let expected = sent * args.subscribers as u64;
    let drain = Instant::now() + Duration::from_secs(5);
    while stats.received.load(Ordering::Relaxed) < expected && Instant::now() < drain {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = began.elapsed().as_secs_f64();
    measuring.store(false, Ordering::Relaxed);
    for s in &subs {
        s.abort();
    }
    let received = stats.received.load(Ordering::Relaxed);
    let mut lat = stats.latencies.lock().await.clone();
    lat.sort_unstable();
    println!(
        "{}",
        serde_json::json!({
            "mode": "pubsub",
            "publishers": args.publishers,
            "subscribers": args.subscribers,
            "qos": args.qos,
            "payload": args.payload,
            "version": args.version,
            "seconds": elapsed,
            "published": sent,
            "delivered": received,
            "published_per_sec": sent as f64 / args.seconds as f64,
            "delivered_per_sec": received as f64 / elapsed,
            "lost": expected.saturating_sub(received),
            "latency_us_p50": percentile(&lat, 0.50),
            "latency_us_p99": percentile(&lat, 0.99),
        })
    );
    Ok(())
}

async fn idle(args: Args) -> Result<(), Error> {
    let mut conns = Vec::with_capacity(args.connections);
    let began = Instant::now();
    for i in 0..args.connections {
        let (sock, _) = connect(&args, &format!("bench-idle-{i}")).await?;
        conns.push(sock);
    }
    let opened = began.elapsed().as_secs_f64();
    if let Some(f) = &args.ready_file {
        std::fs::write(f, b"ready")?;
    }
    tokio::time::sleep(Duration::from_secs(args.hold_seconds)).await;
    println!(
        "{}",
        serde_json::json!({
            "mode": "idle",
            "connections": conns.len(),
            "open_seconds": opened,
        })
    );
    Ok(())
}

fn main() -> Result<(), Error> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match args.mode {
            Mode::Pubsub => pubsub(args).await,
            Mode::Idle => idle(args).await,
        }
    })
}
