//! WAL latency under paced load: appends at a fixed rate, each timed from
//! `append` to its fsync, with truncation following a flush interval behind
//! (as the broker's flusher does) and, optionally, other writes to the same
//! disk (the object files a `file://` store writes).
//!
//! ```sh
//! cargo run --release -p shoal-wal-cache --example wal_latency -- \
//!     --dir /var/tmp/wal-bench --rate 4000 --size 16384 --seconds 20 --noise true
//! ```
//!
//! The first `--warmup-seconds` (default 6) run the same load unmeasured.
//!
//! Prints one JSON line: throughput, latency percentiles and fsync counts.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_wal_cache::{Wal, WalOptions};

struct Args {
    dir: PathBuf,
    rate: u64,
    size: usize,
    seconds: u64,
    truncate_lag: Duration,
    noise: bool,
    warmup: u64,
}

fn parse() -> Args {
    let mut a = Args {
        dir: std::env::temp_dir().join("shoal-wal-latency"),
        rate: 4000,
        size: 16 * 1024,
        seconds: 20,
        truncate_lag: Duration::from_millis(250),
        noise: false,
        warmup: 6,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let [k, v] = pair else {
            panic!("flags come in pairs: --name value");
        };
        match k.as_str() {
            "--dir" => a.dir = PathBuf::from(v),
            "--rate" => a.rate = v.parse().expect("--rate"),
            "--size" => a.size = v.parse().expect("--size"),
            "--seconds" => a.seconds = v.parse().expect("--seconds"),
            "--truncate-lag-ms" => {
                a.truncate_lag = Duration::from_millis(v.parse().expect("--truncate-lag-ms"))
            }
            "--noise" => a.noise = v.parse().expect("--noise"),
            "--warmup-seconds" => a.warmup = v.parse().expect("--warmup-seconds"),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// Writes what a file:// object store would: every 250 ms a file holding
/// what was appended meanwhile, closed without fsync (as object_store does).
fn noise(dir: PathBuf, bytes_per_tick: usize, stop: Arc<AtomicBool>) {
    std::fs::create_dir_all(&dir).expect("noise dir");
    let chunk = vec![0x5au8; bytes_per_tick];
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let path = dir.join(format!("{i:08}.parquet"));
        std::fs::write(&path, &chunk).expect("noise write");
        i += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = parse();
    let _ = std::fs::remove_dir_all(&a.dir);
    let wal = Arc::new(Wal::open(WalOptions::new(a.dir.join("wal"))).expect("open wal"));
    let stop = Arc::new(AtomicBool::new(false));
    let noise_thread = a.noise.then(|| {
        let (dir, stop) = (a.dir.join("objects"), stop.clone());
        let per_tick = (a.rate as usize * a.size) / 4;
        std::thread::spawn(move || noise(dir, per_tick, stop))
    });

    // Start measuring once the log is ready (its spare segments written),
    // as a broker that has run for a while is.
    let ready = std::time::Instant::now();
    while wal.stats().spare_segments < 2 && ready.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let payload = Bytes::from(vec![0xa5u8; a.size]);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Duration)>();
    // The first `warmup` seconds run the same load unmeasured: the log
    // rotates into its first recycled segments as a long-running one does.
    let skip = a.rate * a.warmup;
    let total = a.rate * (a.seconds + a.warmup);
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / a.rate as f64);
    let mut appended: VecDeque<(Instant, u64)> = VecDeque::new();
    let fsyncs_before = wal.stats().fsyncs;
    for i in 0..total {
        // Open loop: send on schedule, however long earlier appends took.
        let due = started + interval * u32::try_from(i).unwrap_or(u32::MAX);
        let now = Instant::now();
        if due > now {
            tokio::time::sleep(due - now).await;
        }
        let t0 = Instant::now();
        let ticket = wal.append(payload.clone()).expect("append");
        appended.push_back((t0, ticket.seq()));
        let tx = tx.clone();
        tokio::spawn(async move {
            ticket.durable().await.expect("durable");
            let _ = tx.send((i, t0.elapsed()));
        });
        // What the flusher would have committed by now.
        let mut through = None;
        while let Some(&(at, seq)) = appended.front() {
            if at.elapsed() < a.truncate_lag {
                break;
            }
            through = Some(seq);
            appended.pop_front();
        }
        if let Some(seq) = through {
            wal.truncate_through(seq).expect("truncate");
        }
    }
    drop(tx);
    let mut lat = Vec::with_capacity(total as usize);
    while let Some((i, d)) = rx.recv().await {
        if i >= skip {
            lat.push(d);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = noise_thread {
        let _ = t.join();
    }
    lat.sort();
    let pct = |p: f64| {
        let i = ((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1));
        lat.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let fsyncs = wal.stats().fsyncs - fsyncs_before;
    println!(
        "{{\"rate\": {}, \"size\": {}, \"mb_per_s\": {:.1}, \"p50_ms\": {:.2}, \"p99_ms\": {:.2}, \"p999_ms\": {:.2}, \"max_ms\": {:.2}, \"fsyncs_per_s\": {:.0}, \"noise\": {}}}",
        a.rate,
        a.size,
        (total as f64 * a.size as f64) / elapsed / 1e6,
        pct(0.50),
        pct(0.99),
        pct(0.999),
        pct(1.0),
        fsyncs as f64 / elapsed,
        a.noise
    );
    drop(wal);
    let _ = std::fs::remove_dir_all(&a.dir);
}
