//! Garbage collection: delete data objects placement does not reference,
//! once their grace period has passed.
//!
//! The store is listed before the index is read. An object a flush commits
//! after that read was therefore written before the listing, within its
//! commit window, so it is young: orphans are deleted only past the orphan
//! grace and never younger than [`MIN_ORPHAN_AGE_MS`]. An object the index
//! stopped referencing is kept `gc_grace` from that moment (placement
//! records it). Forgetting deleted objects is fenced by the compaction
//! lease epoch.

use std::collections::HashSet;

use shoal_placement::{Command, PlacementClient, Reply};
use shoal_storage::ObjectStorage;

use crate::error::{Error, Result};

/// Orphans younger than this are never deleted, whatever the configured
/// grace: a flush or a compaction commits its object within its commit
/// retry window (about 40 s after the PUT), and a commit landing after GC
/// read the index must find its object still there. The margin also covers
/// clock skew between the store and the compactor.
pub const MIN_ORPHAN_AGE_MS: i64 = 120_000;

/// The prefixes whose objects are data GC may delete. Placement's own
/// objects (under `placement/`) are never GC's to touch.
pub const DATA_PREFIXES: [&str; 3] = ["segments", "streams", "staging"];

pub(crate) struct Collect<'a> {
    pub store: &'a ObjectStorage,
    pub placement: &'a PlacementClient,
    pub epoch: u64,
    pub now_ms: i64,
    pub gc_grace_ms: i64,
    pub orphan_grace_ms: i64,
    pub max_deletes: usize,
}

#[derive(Debug, Default)]
pub(crate) struct Collected {
    pub deleted: Vec<String>,
    /// More was due than one batch allows.
    pub unfinished: bool,
}

pub(crate) async fn collect(c: Collect<'_>) -> Result<Collected> {
    let mut listed = Vec::new();
    for prefix in DATA_PREFIXES {
        listed.extend(c.store.list_objects(prefix).await?);
    }
    // The index is read after the listing (see the module comment).
    let streams = c.placement.list_streams().await?;
    let lifecycle = c.placement.lifecycle().await?;
    let referenced: HashSet<&str> = streams
        .iter()
        .flat_map(|s| s.shards.iter())
        .flat_map(|sh| sh.segments.iter().map(|r| r.object.as_str()))
        .collect();
    let mut out = Collected::default();
    let mut forget = Vec::new();
    let present: HashSet<&str> = listed.iter().map(|o| o.key.as_str()).collect();
    for o in &listed {
        if referenced.contains(o.key.as_str()) {
            continue;
        }
        let due = match lifecycle.retired.get(&o.key) {
            Some(&since) => since.saturating_add(c.gc_grace_ms) <= c.now_ms,
            None => {
                o.modified_ms
                    .saturating_add(c.orphan_grace_ms.max(MIN_ORPHAN_AGE_MS))
                    <= c.now_ms
            }
        };
        if !due {
            continue;
        }
        if out.deleted.len() >= c.max_deletes {
            out.unfinished = true;
            break;
        }
        c.store.delete(&o.key).await?;
        if lifecycle.retired.contains_key(&o.key) {
            forget.push(o.key.clone());
        }
        out.deleted.push(o.key.clone());
    }
    // Retired objects already gone (an earlier run deleted them and its
    // forget did not land) are forgotten too.
    forget.extend(
        lifecycle
            .retired
            .keys()
            .filter(|k| !present.contains(k.as_str()) && !referenced.contains(k.as_str()))
            .cloned(),
    );
    if !forget.is_empty() {
        match c
            .placement
            .write(Command::ForgetRetired {
                compaction_epoch: c.epoch,
                objects: forget,
            })
            .await?
        {
            Reply::Done => {}
            Reply::Rejected { rejection } => {
                return Err(Error::Rejected {
                    what: "forgetting deleted objects".into(),
                    rejection,
                });
            }
            other => {
                return Err(Error::Unexpected {
                    what: "ForgetRetired".into(),
                    reply: format!("{other:?}"),
                });
            }
        }
    }
    Ok(out)
}
