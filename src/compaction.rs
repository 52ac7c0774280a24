//! Compaction settings shared by `shoal standalone` (flags, `SHOAL_*`,
//! TOML) and `shoal compactor`, and the `shoal compactor` role itself.

use std::time::Duration;

use clap::Args;
use shoal_compactor::{Budget, Compactor, CompactorConfig};
use shoal_placement::PlacementClient;
use shoal_storage::ObjectStorage;

use crate::config::{ConfigError, err, parse_bytes};

#[derive(Debug, Default, Args)]
pub struct CompactionArgs {
    /// Flush objects younger than this are left alone (e.g. 5m).
    #[arg(long, env = "SHOAL_COMPACTION_DELAY")]
    pub compaction_delay: Option<String>,
    /// How often a compaction run starts (e.g. 60s).
    #[arg(long, env = "SHOAL_COMPACTION_INTERVAL")]
    pub compaction_interval: Option<String>,
    /// Replaced objects are deleted this long after placement stops
    /// referencing them (e.g. 10m).
    #[arg(long, env = "SHOAL_GC_GRACE")]
    pub gc_grace: Option<String>,
    /// Objects placement never referenced (a crash between write and
    /// commit) are deleted this long after they were written (e.g. 1h).
    #[arg(long, env = "SHOAL_ORPHAN_GRACE")]
    pub orphan_grace: Option<String>,
    /// Size compacted files grow to (e.g. 256MiB).
    #[arg(long, env = "SHOAL_COMPACTION_TARGET_SIZE")]
    pub compaction_target_size: Option<String>,
}

/// The same settings as read from a TOML file.
#[derive(Debug, Default)]
pub struct CompactionFile {
    pub compaction_delay: Option<String>,
    pub compaction_interval: Option<String>,
    pub gc_grace: Option<String>,
    pub orphan_grace: Option<String>,
    pub compaction_target_size: Option<toml::Value>,
}

/// Resolved compaction settings.
#[derive(Debug, Clone)]
pub struct Compaction {
    pub delay: Duration,
    pub interval: Duration,
    pub gc_grace: Duration,
    pub orphan_grace: Duration,
    pub target_size: u64,
}

fn duration(flag: &str, v: Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    match v {
        Some(s) => {
            humantime::parse_duration(&s).map_err(|e| err(format!("invalid --{flag} {s:?}: {e}")))
        }
        None => Ok(default),
    }
}

impl CompactionArgs {
    pub fn resolve(self, file: CompactionFile) -> Result<Compaction, ConfigError> {
        let interval = duration(
            "compaction-interval",
            self.compaction_interval.or(file.compaction_interval),
            Duration::from_secs(60),
        )?;
        if interval.is_zero() {
            return Err(err("--compaction-interval must be greater than zero"));
        }
        let target_size = match (self.compaction_target_size, file.compaction_target_size) {
            (Some(s), _) => parse_bytes(&s)?,
            (None, Some(toml::Value::Integer(n))) => {
                u64::try_from(n).map_err(|_| err("compaction-target-size must be positive"))?
            }
            (None, Some(toml::Value::String(s))) => parse_bytes(&s)?,
            (None, Some(v)) => return Err(err(format!("invalid compaction-target-size {v}"))),
            (None, None) => 256 << 20,
        };
        if target_size < 1024 {
            return Err(err("--compaction-target-size must be at least 1KiB"));
        }
        Ok(Compaction {
            delay: duration(
                "compaction-delay",
                self.compaction_delay.or(file.compaction_delay),
                Duration::from_secs(300),
            )?,
            interval,
            gc_grace: duration(
                "gc-grace",
                self.gc_grace.or(file.gc_grace),
                Duration::from_secs(600),
            )?,
            orphan_grace: duration(
                "orphan-grace",
                self.orphan_grace.or(file.orphan_grace),
                Duration::from_secs(3600),
            )?,
            target_size,
        })
    }
}

impl Compaction {
    pub fn compactor_config(&self, holder: String) -> CompactorConfig {
        let mut c = CompactorConfig::new(holder);
        c.delay = self.delay;
        c.gc_grace = self.gc_grace;
        c.orphan_grace = self.orphan_grace;
        c.target_size = self.target_size;
        c
    }
}

/// `--default-retention`: a duration, or -1 / `unlimited` for none.
pub fn parse_retention(s: &str) -> Result<i64, ConfigError> {
    match s.trim() {
        "-1" | "unlimited" => Ok(-1),
        other => humantime::parse_duration(other)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .map_err(|e| err(format!("invalid --default-retention {s:?}: {e}"))),
    }
}

/// Make placement's cluster-wide default retention `retention_ms`, unless
/// it already is. Retries while placement elects a leader.
pub async fn set_default_retention(placement: &PlacementClient, retention_ms: i64) {
    for _ in 0..60 {
        let current = placement.lifecycle().await;
        let done = match current {
            Ok(l) if l.default_retention_ms == Some(retention_ms) => true,
            Ok(_) => placement
                .write(shoal_placement::Command::SetDefaultRetention { retention_ms })
                .await
                .is_ok(),
            Err(_) => false,
        };
        if done {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tracing::warn!("could not set the default retention in placement");
}

#[derive(Debug, Args)]
pub struct CompactorArgs {
    /// Placement nodes: HOST:PORT[,HOST:PORT...] (a standalone node's HTTP
    /// address will do).
    #[arg(long, env = "SHOAL_PLACEMENT")]
    pub placement: String,
    /// The object store the brokers write to: s3://bucket/prefix or file:///dir.
    #[arg(long, env = "SHOAL_OBJECT_STORE")]
    pub object_store: String,
    /// One run, then exit.
    #[arg(long)]
    pub once: bool,
    /// The cluster secret (or SHOAL_CLUSTER_SECRET); without one, the
    /// operator's token in SHOAL_TOKEN, if any.
    #[arg(long, env = "SHOAL_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<std::path::PathBuf>,
    /// Call placement over HTTPS (nodes with --http-tls), trusting this PEM
    /// CA besides the system's roots.
    #[arg(long, env = "SHOAL_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub compaction: CompactionArgs,
}

/// `shoal compactor`: runs on an interval (or once) against a cluster.
pub async fn compactor(args: CompactorArgs) -> Result<(), String> {
    let settings = args
        .compaction
        .resolve(CompactionFile::default())
        .map_err(|e| e.to_string())?;
    let addrs: Vec<String> = args
        .placement
        .split(',')
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    if addrs.is_empty() {
        return Err("--placement is empty".into());
    }
    let store = ObjectStorage::from_url(&args.object_store)
        .map_err(|e| format!("object store {}: {e}", args.object_store))?;
    let auth = match crate::auth::cluster_secret(args.cluster_secret_file.clone())
        .map_err(|e| e.to_string())?
    {
        Some(secret) => shoal_security::ClientAuth::bearer(secret),
        None => shoal_security::ClientAuth::from_token_env().map_err(|e| e.to_string())?,
    };
    let auth = match &args.tls_ca {
        Some(ca) => auth.with_https(Some(ca)).map_err(|e| e.to_string())?,
        None => auth,
    };
    let compactor = Compactor::new(
        PlacementClient::remote(addrs, &auth),
        store.clone(),
        settings.compactor_config(shoal_compactor::holder_name("compactor")),
    );
    if args.once {
        let report = compactor
            .run_once(Budget::UNLIMITED)
            .await
            .map_err(|e| format!("compaction: {e}"))?;
        // The run and the object-store requests it made (for cost figures).
        let s = store.stats();
        let doc = serde_json::json!({
            "run": report,
            "requests": {
                "put": s.puts, "get": s.gets, "head": s.heads, "delete": s.deletes,
                "list": s.lists, "bytes_read": s.bytes_read, "bytes_written": s.bytes_written,
            },
        });
        println!("{doc}");
        if !report.errors.is_empty() {
            return Err(format!(
                "the compaction run had {} error(s): {}",
                report.errors.len(),
                report.errors.join("; ")
            ));
        }
        return Ok(());
    }
    let (tx, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(shoal_compactor::run_every(compactor, settings.interval, rx));
    tracing::info!(interval = ?settings.interval, "shoal compactor is running");
    crate::wait_for_signal().await;
    let _ = tx.send(true);
    let _ = task.await;
    Ok(())
}
