//! Placement's copy in the bucket, so that a standalone node whose local
//! disk is lost resumes from object storage alone, and so that two nodes on
//! one bucket cannot both write.
//!
//! Layout under the store's prefix:
//! - `placement/lease.json`: `{holder, expires_ms}`, taken with a
//!   create-only PUT and renewed with If-Match; a node that finds another
//!   holder's unexpired lease refuses to start.
//! - `placement/log/<first:020>-<last:020>.json`: applied commands by state
//!   version, written create-only in order (a second writer collides).
//! - `placement/snapshot/<version:020>.json`: the whole state; older
//!   snapshots and the log behind the newest one are deleted.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
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
}

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
    ttl: Duration,
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
    pub async fn acquire(store: ObjectStorage, ttl: Duration, holder: &str) -> Result<Bucket> {
        let holder = holder.to_string();
        let lease = |holder: &str| -> Result<Bytes> {
            serde_json::to_vec(&Lease {
                holder: holder.to_string(),
                expires_ms: now_ms() + ttl.as_millis() as i64,
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
            ttl,
            etag: tokio::sync::Mutex::new(etag),
            valid_until: parking_lot::Mutex::new(started + ttl),
        })
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
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
                Some(serde_json::from_slice::<State>(&bytes).map_err(bucket_err)?)
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
    use std::collections::BTreeMap;

    fn create(name: &str) -> Command {
        Command::CreateStream {
            name: name.into(),
            partitions: 1,
            config: BTreeMap::new(),
            id: 1,
            now_ms: 0,
        }
    }

    #[tokio::test]
    async fn second_holder_is_fenced_until_the_lease_expires() {
        let store = ObjectStorage::from_url("memory://").unwrap();
        let a = Bucket::acquire(store.clone(), Duration::from_millis(300), "a")
            .await
            .unwrap();
        assert!(matches!(
            Bucket::acquire(store.clone(), Duration::from_millis(300), "b").await,
            Err(Error::Fenced(_))
        ));
        a.renew().await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let b = Bucket::acquire(store.clone(), Duration::from_secs(5), "b")
            .await
            .unwrap();
        // The old holder finds out at its next renewal.
        assert!(matches!(a.renew().await, Err(Error::Fenced(_))));
        // The same holder restarting (a crash) takes its own lease back.
        let b2 = Bucket::acquire(store.clone(), Duration::from_secs(5), "b")
            .await
            .unwrap();
        // Same holder name, same node: its older handle may renew too.
        b.renew().await.unwrap();
        b2.renew().await.unwrap();
        b2.release().await;
        Bucket::acquire(store, Duration::from_secs(5), "c")
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn snapshot_plus_log_rebuilds_the_state() {
        let store = ObjectStorage::from_url("memory://").unwrap();
        let b = Bucket::acquire(store.clone(), Duration::from_secs(5), "a")
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
