//! Placement's copy in the bucket, so that a standalone node whose local
//! disk is lost resumes from object storage alone, and so that two nodes on
//! one bucket cannot both write.
//!
//! Layout under the store's prefix:
//! - `placement/lease.json`: `{holder, expires_ms, contact}`, taken with a
//!   create-only PUT and renewed with If-Match while the node writes. An
//!   idle node lets it lapse (no PUTs while nothing changes) and renews it
//!   before its next write; meanwhile it watches the lease with GETs. A node
//!   that finds another holder's unexpired lease, or an expired one whose
//!   holder still answers at `contact`, refuses to start.
//! - `placement/log/<first:020>-<last:020>.json`: applied commands by state
//!   version, written create-only in order (a second writer collides).
//! - `placement/snapshot/<version:020>.json`: the whole state; older
//!   snapshots and the log behind the newest one are deleted.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shoal_security::ClientAuth;
use shoal_storage::ObjectStorage;

use crate::command::Command;
use crate::error::{Error, Result};
use crate::state::State;

const LEASE: &str = "placement/lease.json";
const LOG: &str = "placement/log";
const SNAPSHOT: &str = "placement/snapshot";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Lease {
    holder: String,
    expires_ms: i64,
    /// Base URL where the holder answers `GET` [`HOLDER_PATH`] with its name
    /// while it runs, so an idle (lapsed) lease is not taken from a live node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    contact: Option<String>,
}

/// Path under a node's contact URL answering the name of the bucket holder.
pub const HOLDER_PATH: &str = "/placement/v1/bucket-holder";

/// One entry of the bucket log: the state version the command produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoggedCommand {
    pub version: u64,
    pub command: Command,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn bucket_err(e: impl std::fmt::Display) -> Error {
    Error::Bucket(e.to_string())
}

/// A held lease on the bucket plus the journal operations.
pub struct Bucket {
    store: ObjectStorage,
    holder: String,
    contact: Option<String>,
    ttl: Duration,
    /// The last write to the bucket: the lease is renewed only while the
    /// node has written within a TTL, so an idle node makes no PUTs.
    last_write: parking_lot::Mutex<tokio::time::Instant>,
    etag: tokio::sync::Mutex<String>,
    /// Until when the lease is surely ours: the start of the last successful
    /// write of it plus the TTL. Past it, another node may hold it.
    valid_until: parking_lot::Mutex<tokio::time::Instant>,
}

impl Bucket {
    /// Take the bucket lease as `holder`, or fail with [`Error::Fenced`]
    /// naming the current holder while its lease is unexpired. A lease
    /// already held under the same name (this node before a crash) is taken
    /// back at once.
    ///
    /// Conditional PUTs are retried by the store client after a lost
    /// response, so a precondition failure may be our own earlier attempt:
    /// every such case re-reads the lease and goes by the holder named in it.
    pub async fn acquire(
        store: ObjectStorage,
        ttl: Duration,
        holder: &str,
        contact: Option<&str>,
        auth: &ClientAuth,
    ) -> Result<Bucket> {
        let holder = holder.to_string();
        let contact = contact.map(str::to_string);
        let lease = |holder: &str| -> Result<Bytes> {
            serde_json::to_vec(&Lease {
                holder: holder.to_string(),
                expires_ms: now_ms() + ttl.as_millis() as i64,
                contact: contact.clone(),
            })
            .map(Bytes::from)
            .map_err(bucket_err)
        };
        let started = tokio::time::Instant::now();
        match read_lease(&store).await? {
            None => match store.put_create(LEASE, lease(&holder)?).await {
                Ok(()) | Err(shoal_storage::Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(bucket_err(e)),
            },
            Some((current, etag)) => {
                let left = current.expires_ms - now_ms();
                if left > 0 && current.holder != holder {
                    return Err(Error::Fenced(format!(
                        "the bucket is in use by placement node {} (its lease runs \
                         {:.1} s more; it is renewed while that node runs)",
                        current.holder,
                        left as f64 / 1000.0
                    )));
                }
                if current.holder != holder
                    && let Some(url) = &current.contact
                    && holder_answers(url, &current.holder, auth).await
                {
                    return Err(Error::Fenced(format!(
                        "the bucket is in use by placement node {}, which is idle but \
                         still answers at {url}",
                        current.holder
                    )));
                }
                match store.put_replace(LEASE, lease(&holder)?, &etag).await {
                    Ok(_) | Err(shoal_storage::Error::Changed { .. }) => {}
                    Err(e) => return Err(bucket_err(e)),
                }
            }
        }
        let (current, etag) = read_lease(&store)
            .await?
            .ok_or_else(|| bucket_err("the lease vanished while it was taken"))?;
        if current.holder != holder {
            return Err(Error::Fenced(format!(
                "the bucket is in use by placement node {}, which took the lease at \
                 the same moment",
                current.holder
            )));
        }
        tracing::info!(holder = %holder, "took the bucket lease for placement");
        Ok(Bucket {
            store,
            holder,
            contact,
            ttl,
            last_write: parking_lot::Mutex::new(started),
            etag: tokio::sync::Mutex::new(etag),
            valid_until: parking_lot::Mutex::new(started + ttl),
        })
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Has the node written to the bucket within the last TTL? Only then is
    /// the lease kept fresh.
    pub fn active(&self) -> bool {
        self.last_write.lock().elapsed() < self.ttl
    }

    /// Read the lease without writing it (the watch of an idle node):
    /// [`Error::Fenced`] if another node took it.
    pub async fn check(&self) -> Result<()> {
        match read_lease(&self.store).await? {
            Some((current, _)) if current.holder == self.holder => Ok(()),
            Some((current, _)) => Err(Error::Fenced(format!(
                "the bucket lease was taken over by placement node {}",
                current.holder
            ))),
            None => Err(Error::Fenced("the bucket lease was deleted".into())),
        }
    }

    /// Is the lease surely still ours? Writes to the bucket wait while not.
    pub fn lease_valid(&self) -> bool {
        tokio::time::Instant::now() < *self.valid_until.lock()
    }

    /// Extend the lease. [`Error::Fenced`] if someone else holds it now.
    pub async fn renew(&self) -> Result<()> {
        let started = tokio::time::Instant::now();
        let mut etag = self.etag.lock().await;
        let result = self.renew_locked(&mut etag).await;
        if result.is_ok() {
            *self.valid_until.lock() = started + self.ttl;
        }
        result
    }

    async fn renew_locked(&self, etag: &mut String) -> Result<()> {
        let body = serde_json::to_vec(&Lease {
            holder: self.holder.clone(),
            expires_ms: now_ms() + self.ttl.as_millis() as i64,
            contact: self.contact.clone(),
        })
        .map_err(bucket_err)?;
        match self.store.put_replace(LEASE, Bytes::from(body), etag).await {
            Ok(Some(e)) => {
                *etag = e;
                Ok(())
            }
            Ok(None) => Err(bucket_err("the object store gives no ETags")),
            Err(shoal_storage::Error::Changed { .. }) => match read_lease(&self.store).await? {
                // Our own retried renewal landed first.
                Some((current, e)) if current.holder == self.holder => {
                    *etag = e;
                    Ok(())
                }
                Some((current, _)) => Err(Error::Fenced(format!(
                    "the bucket lease was taken over by placement node {}",
                    current.holder
                ))),
                None => Err(Error::Fenced("the bucket lease was deleted".into())),
            },
            Err(e) => Err(bucket_err(e)),
        }
    }

    /// Give the lease up at a clean stop, so the next node need not wait.
    pub async fn release(&self) {
        let etag = self.etag.lock().await;
        let body = serde_json::to_vec(&Lease {
            holder: self.holder.clone(),
            expires_ms: 0,
            contact: None,
        })
        .unwrap_or_default();
        if let Err(e) = self
            .store
            .put_replace(LEASE, Bytes::from(body), &etag)
            .await
        {
            tracing::warn!("releasing the bucket lease: {e}");
        }
    }

    /// Append commands (consecutive versions) as one create-only object.
    pub async fn write_log(&self, entries: &[LoggedCommand]) -> Result<()> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(());
        };
        *self.last_write.lock() = tokio::time::Instant::now();
        let key = format!("{LOG}/{:020}-{:020}.json", first.version, last.version);
        let body = serde_json::to_vec(entries).map_err(bucket_err)?;
        let body = Bytes::from(body);
        match self.store.put_create(&key, body.clone()).await {
            Ok(()) => Ok(()),
            // A retried PUT whose first attempt landed finds its own bytes.
            Err(shoal_storage::Error::AlreadyExists { .. })
                if self.store.get(&key).await.ok().as_ref() == Some(&body) =>
            {
                Ok(())
            }
            Err(shoal_storage::Error::AlreadyExists { .. }) => {
                Err(Error::Fenced(format!("{key} was written by another node")))
            }
            Err(e) => Err(bucket_err(e)),
        }
    }

    /// Store the whole state, then drop what it makes redundant.
    pub async fn write_snapshot(&self, state: &State) -> Result<()> {
        let key = format!("{SNAPSHOT}/{:020}.json", state.version);
        let body = serde_json::to_vec(state).map_err(bucket_err)?;
        match self.store.put_create(&key, Bytes::from(body)).await {
            Ok(()) | Err(shoal_storage::Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(bucket_err(e)),
        }
        for (k, _) in self.store.list(SNAPSHOT).await.map_err(bucket_err)? {
            if snapshot_version(&k).is_some_and(|v| v < state.version) {
                let _ = self.store.delete(&k).await;
            }
        }
        for (k, _) in self.store.list(LOG).await.map_err(bucket_err)? {
            if log_range(&k).is_some_and(|(_, last)| last <= state.version) {
                let _ = self.store.delete(&k).await;
            }
        }
        Ok(())
    }

    /// The newest state the bucket holds: the latest snapshot plus the
    /// log after it. `None` for a bucket placement never wrote to.
    pub async fn load(&self) -> Result<Option<State>> {
        let snapshots = self.store.list(SNAPSHOT).await.map_err(bucket_err)?;
        let latest = snapshots
            .iter()
            .filter_map(|(k, _)| snapshot_version(k).map(|v| (v, k)))
            .max_by_key(|(v, _)| *v);
        let mut state = match latest {
            Some((_, key)) => {
                let bytes = self.store.get(key).await.map_err(bucket_err)?;
                let state = serde_json::from_slice::<State>(&bytes).map_err(bucket_err)?;
                if state.format > crate::state::STATE_FORMAT {
                    return Err(bucket_err(format!(
                        "snapshot {key} has format {}, written by a newer version",
                        state.format
                    )));
                }
                Some(state)
            }
            None => None,
        };
        let mut logs: Vec<((u64, u64), String)> = self
            .store
            .list(LOG)
            .await
            .map_err(bucket_err)?
            .into_iter()
            .filter_map(|(k, _)| log_range(&k).map(|r| (r, k)))
            .collect();
        logs.sort();
        for ((_, last), key) in logs {
            let current = state.as_ref().map_or(0, |s| s.version);
            if last <= current {
                continue;
            }
            let bytes = self.store.get(&key).await.map_err(bucket_err)?;
            let entries: Vec<LoggedCommand> = serde_json::from_slice(&bytes).map_err(bucket_err)?;
            for e in entries {
                let s = state.get_or_insert_with(State::default);
                if e.version <= s.version {
                    continue;
                }
                if e.version != s.version + 1 {
                    return Err(bucket_err(format!(
                        "placement log in the bucket has a gap: at version {}, next is {}",
                        s.version, e.version
                    )));
                }
                s.apply(e.command);
            }
        }
        Ok(state)
    }
}

/// Does the node at `url` answer, within a short time, that it is `holder`?
/// A stopped, frozen or unreachable node does not; a different node that
/// now listens there names another holder. A node that refuses our
/// credentials (401) runs: it counts as answering, so the bucket is not
/// taken from under it.
async fn holder_answers(url: &str, holder: &str, auth: &ClientAuth) -> bool {
    let Ok(client) = auth.http_client().timeout(Duration::from_secs(2)).build() else {
        return false;
    };
    let url = format!("{}{HOLDER_PATH}", url.trim_end_matches('/'));
    let Ok(mut r) = client.get(&url).send().await else {
        return false;
    };
    if r.status() == reqwest::StatusCode::UNAUTHORIZED {
        tracing::warn!(%url, "the bucket's holder refused this node's credentials; taking it as alive");
        return true;
    }
    if !r.status().is_success() {
        return false;
    }
    // Whatever answers there is not trusted: read no more than a name.
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = r.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() > 256 {
            return false;
        }
    }
    std::str::from_utf8(&body).is_ok_and(|t| t.trim() == holder)
}

/// The lease and its ETag, if there is one.
async fn read_lease(store: &ObjectStorage) -> Result<Option<(Lease, String)>> {
    match store.get_versioned(LEASE).await {
        Ok((bytes, etag)) => {
            let lease: Lease = serde_json::from_slice(&bytes).map_err(bucket_err)?;
            let etag = etag.ok_or_else(|| bucket_err("the object store gives no ETags"))?;
            Ok(Some((lease, etag)))
        }
        Err(shoal_storage::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(bucket_err(e)),
    }
}

fn snapshot_version(key: &str) -> Option<u64> {
    key.strip_prefix(SNAPSHOT)?
        .trim_start_matches('/')
        .strip_suffix(".json")?
        .parse()
        .ok()
}

fn log_range(key: &str) -> Option<(u64, u64)> {
    let name = key
        .strip_prefix(LOG)?
        .trim_start_matches('/')
        .strip_suffix(".json")?;
    let (a, b) = name.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A holder without a contact address, on a node without credentials.
    async fn acquire(store: ObjectStorage, ttl: Duration, holder: &str) -> Result<Bucket> {
        Bucket::acquire(store, ttl, holder, None, &ClientAuth::none()).await
    }

    fn create(name: &str) -> Command {
        Command::create_for_test(name, 1)
    }

    #[tokio::test]
    async fn second_holder_is_fenced_until_the_lease_expires() {
        let store = ObjectStorage::from_url("memory://").unwrap();
        let a = acquire(store.clone(), Duration::from_millis(300), "a")
            .await
            .unwrap();
        assert!(matches!(
            acquire(store.clone(), Duration::from_millis(300), "b").await,
            Err(Error::Fenced(_))
        ));
        a.renew().await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let b = acquire(store.clone(), Duration::from_secs(5), "b")
            .await
            .unwrap();
        // The old holder finds out at its next renewal.
        assert!(matches!(a.renew().await, Err(Error::Fenced(_))));
        // The same holder restarting (a crash) takes its own lease back.
        let b2 = acquire(store.clone(), Duration::from_secs(5), "b")
            .await
            .unwrap();
        // Same holder name, same node: its older handle may renew too.
        b.renew().await.unwrap();
        b2.renew().await.unwrap();
        b2.release().await;
        acquire(store, Duration::from_secs(5), "c").await.unwrap();
    }

    #[tokio::test]
    async fn an_idle_holder_that_answers_keeps_the_bucket() {
        let store = ObjectStorage::from_url("memory://").unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().route(HOLDER_PATH, axum::routing::get(|| async { "a" }));
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let ttl = Duration::from_millis(200);
        let a = Bucket::acquire(store.clone(), ttl, "a", Some(&url), &ClientAuth::none())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!a.active() && !a.lease_valid());
        // Lapsed, but its holder answers: refused.
        let refused = acquire(store.clone(), ttl, "b").await;
        assert!(matches!(refused, Err(Error::Fenced(why)) if why.contains("answers")));
        a.check().await.unwrap();
        // It renews before writing again, and keeps the bucket.
        a.renew().await.unwrap();
        assert!(a.lease_valid());
        // Once it no longer answers, the lapsed lease may be taken over.
        server.abort();
        let _ = server.await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        acquire(store.clone(), ttl, "b").await.unwrap();
        assert!(matches!(a.check().await, Err(Error::Fenced(_))));
        assert!(matches!(a.renew().await, Err(Error::Fenced(_))));
    }

    #[tokio::test]
    async fn snapshot_plus_log_rebuilds_the_state() {
        let store = ObjectStorage::from_url("memory://").unwrap();
        let b = acquire(store.clone(), Duration::from_secs(5), "a")
            .await
            .unwrap();
        assert!(b.load().await.unwrap().is_none());
        let mut expected = State::default();
        let mut log = Vec::new();
        for name in ["a", "b", "c"] {
            expected.apply(create(name));
            log.push(LoggedCommand {
                version: expected.version,
                command: create(name),
            });
        }
        b.write_log(&log[..2]).await.unwrap();
        b.write_log(&log[2..]).await.unwrap();
        assert_eq!(b.load().await.unwrap().unwrap(), expected);
        // The same bytes again is a retry of our own write; different
        // bytes at the same versions mean another writer: fenced.
        b.write_log(&log[2..]).await.unwrap();
        let other = LoggedCommand {
            version: log[2].version,
            command: create("intruder"),
        };
        assert!(matches!(b.write_log(&[other]).await, Err(Error::Fenced(_))));
        b.write_snapshot(&expected).await.unwrap();
        assert!(store.list(LOG).await.unwrap().is_empty());
        expected.apply(create("d"));
        b.write_log(&[LoggedCommand {
            version: expected.version,
            command: create("d"),
        }])
        .await
        .unwrap();
        assert_eq!(b.load().await.unwrap().unwrap(), expected);
    }
}
