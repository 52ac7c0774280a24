//! `shoal-compactor-lambda`: the compactor as an AWS Lambda function,
//! invoked by an EventBridge schedule. Each invocation runs one bounded
//! pass: it stops starting new work when the time left before the
//! invocation's deadline falls under a margin, answers with what it did,
//! and leaves the rest to the next invocation.
//!
//! Configured by environment: `SHOAL_PLACEMENT` (HOST:PORT[,...]),
//! `SHOAL_OBJECT_STORE` (s3://bucket/prefix), optional
//! `SHOAL_COMPACTION_DELAY`, `SHOAL_GC_GRACE`, `SHOAL_ORPHAN_GRACE`,
//! `SHOAL_COMPACTION_TARGET_SIZE` (bytes), `SHOAL_DEADLINE_MARGIN`; the
//! cluster secret in `SHOAL_CLUSTER_SECRET_ARN` (Secrets Manager) or
//! `SHOAL_CLUSTER_SECRET`, `SHOAL_TLS_CA` for placement over HTTPS; the
//! usual `AWS_*` variables reach the S3 and Secrets Manager clients.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lambda_events::eventbridge::EventBridgeEvent;
use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use serde_json::{Value, json};
use shoal_compactor::{Budget, Compactor, CompactorConfig, Error};
use shoal_placement::PlacementClient;
use shoal_storage::ObjectStorage;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn env_duration(name: &str, default: Duration) -> Result<Duration, BoxError> {
    match std::env::var(name) {
        Ok(v) => humantime::parse_duration(&v).map_err(|e| format!("{name}={v:?}: {e}").into()),
        Err(_) => Ok(default),
    }
}

struct Setup {
    compactor: Compactor,
    margin: Duration,
}

/// The cluster secret: from Secrets Manager when `SHOAL_CLUSTER_SECRET_ARN`
/// names one, else `SHOAL_CLUSTER_SECRET` (say, from the function's
/// encrypted environment); none when neither is set.
async fn cluster_secret() -> Result<Option<shoal_security::Secret>, BoxError> {
    let arn = std::env::var("SHOAL_CLUSTER_SECRET_ARN")
        .ok()
        .filter(|a| !a.trim().is_empty());
    let Some(arn) = arn else {
        return Ok(shoal_security::Secret::from_file_or_env(
            None,
            "SHOAL_CLUSTER_SECRET",
        )?);
    };
    if std::env::var_os("SHOAL_CLUSTER_SECRET").is_some() {
        return Err("set SHOAL_CLUSTER_SECRET_ARN or SHOAL_CLUSTER_SECRET, not both".into());
    }
    Ok(Some(shoal_security::aws_secret::fetch(arn.trim()).await?))
}

async fn setup() -> Result<Setup, BoxError> {
    let placement = std::env::var("SHOAL_PLACEMENT").map_err(|_| "SHOAL_PLACEMENT is not set")?;
    let addrs: Vec<String> = placement
        .split(',')
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    if addrs.is_empty() {
        return Err("SHOAL_PLACEMENT is empty".into());
    }
    let url = std::env::var("SHOAL_OBJECT_STORE").map_err(|_| "SHOAL_OBJECT_STORE is not set")?;
    let store = ObjectStorage::from_url(&url).map_err(|e| format!("object store {url}: {e}"))?;
    let mut config = CompactorConfig::new(shoal_compactor::holder_name("lambda"));
    config.delay = env_duration("SHOAL_COMPACTION_DELAY", config.delay)?;
    config.gc_grace = env_duration("SHOAL_GC_GRACE", config.gc_grace)?;
    config.orphan_grace = env_duration("SHOAL_ORPHAN_GRACE", config.orphan_grace)?;
    if let Ok(v) = std::env::var("SHOAL_COMPACTION_TARGET_SIZE") {
        config.target_size = v
            .parse()
            .map_err(|e| format!("SHOAL_COMPACTION_TARGET_SIZE={v:?}: {e}"))?;
    }
    let margin = env_duration("SHOAL_DEADLINE_MARGIN", Duration::from_secs(30))?;
    let auth = match cluster_secret().await? {
        Some(secret) => shoal_security::ClientAuth::bearer(secret),
        None => shoal_security::ClientAuth::none(),
    };
    // Placement over HTTPS: the CA that signed its certificate (a PEM file
    // in the deployment package); the system roots otherwise.
    let auth = match std::env::var_os("SHOAL_TLS_CA") {
        Some(ca) => auth
            .with_https(Some(std::path::Path::new(&ca)))
            .map_err(|e| format!("SHOAL_TLS_CA: {e}"))?,
        None => auth,
    };
    Ok(Setup {
        compactor: Compactor::new(PlacementClient::remote(addrs, &auth), store, config),
        margin,
    })
}

/// The invocation's deadline (ms since the epoch) as an [`Instant`].
fn deadline_instant(deadline_ms: u64) -> Instant {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Instant::now() + Duration::from_millis(deadline_ms.saturating_sub(now_ms))
}

/// A failed run as Lambda reports it: a named error type (for the console
/// and metrics) instead of a Rust type path.
fn failure(e: &Error) -> Diagnostic {
    let error_type = match e {
        Error::Placement(_) => "PlacementUnavailable",
        Error::Storage(_) => "ObjectStoreError",
        Error::Rejected { .. } => "PlacementRejected",
        _ => "CompactionFailed",
    };
    Diagnostic {
        error_type: error_type.into(),
        error_message: e.to_string(),
    }
}

async fn handle(
    setup: &Setup,
    event: LambdaEvent<EventBridgeEvent<Value>>,
) -> Result<Value, Diagnostic> {
    let budget = Budget {
        deadline: Some(deadline_instant(event.context.deadline)),
        margin: setup.margin,
    };
    tracing::info!(request = %event.context.request_id, source = ?event.payload.source, "scheduled compaction");
    match setup.compactor.run_once(budget).await {
        Ok(report) if report.errors.is_empty() => Ok(json!({ "status": "done", "run": report })),
        // Some work failed (the rest was done and committed): a failed
        // invocation, so it shows in Lambda's error metrics.
        Ok(report) => Err(Diagnostic {
            error_type: "CompactionRunFailed".into(),
            error_message: format!(
                "{} error(s): {}",
                report.errors.len(),
                report.errors.join("; ")
            ),
        }),
        // The previous invocation still runs: nothing to do this time.
        Err(Error::LeaseHeld { holder, until_ms }) => Ok(json!({
            "status": "skipped",
            "reason": format!("the compaction lease is held by {holder} until {until_ms}"),
        })),
        Err(e) => Err(failure(&e)),
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .without_time()
        .init();
    let setup = setup().await?;
    let setup = &setup;
    lambda_runtime::run(service_fn(move |event| handle(setup, event))).await
}
