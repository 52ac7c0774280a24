//! Where WAL entries of a stopped shard go before the WAL may truncate them.
//!
//! Replay stops a shard whose records cannot all be read back and skips its
//! later entries (serving them would leave a hole in its offsets). Those
//! entries, and the damaged ones, are acknowledged records: they are copied
//! here, one file per shard, so that other shards' flushes truncating the
//! WAL never destroy them. An operator investigates them before resuming
//! the shard.
//!
//! A file is `<data_dir>/quarantine/<stream>.<shard>.<first seq>.entries`
//! (the WAL sequence number of its first entry, so that replaying the same
//! WAL again rewrites the same file):
//! a sequence of frames, each the WAL sequence number (u64, big-endian),
//! the payload length (u32, big-endian) and the WAL entry's payload as the
//! WAL held it (a WAL record, possibly damaged).

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;

/// Write `entries` of `stream`/`shard` under `dir` and make them durable.
pub(crate) fn keep(
    dir: &Path,
    stream: &str,
    shard: i32,
    entries: &[(u64, Bytes)],
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let first = entries.first().map_or(0, |e| e.0);
    // Stream names are Kafka topic names ([a-zA-Z0-9._-]), safe in a path.
    let path = dir.join(format!("{stream}.{shard}.{first}.entries"));
    let tmp = path.with_extension("partial");
    let mut f = std::fs::File::create(&tmp)?;
    let mut out = std::io::BufWriter::new(&mut f);
    for (seq, payload) in entries {
        let len = u32::try_from(payload.len()).map_err(std::io::Error::other)?;
        out.write_all(&seq.to_be_bytes())?;
        out.write_all(&len.to_be_bytes())?;
        out.write_all(payload)?;
    }
    out.flush()?;
    drop(out);
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_hold_sequence_length_and_payload() {
        let dir = tempfile::tempdir().unwrap();
        let entries = vec![(7u64, Bytes::from_static(b"abc")), (9, Bytes::new())];
        let path = keep(dir.path(), "orders", 3, &entries).unwrap();
        assert!(path.ends_with("orders.3.7.entries"));
        let got = std::fs::read(path).unwrap();
        let mut want = Vec::new();
        want.extend_from_slice(&7u64.to_be_bytes());
        want.extend_from_slice(&3u32.to_be_bytes());
        want.extend_from_slice(b"abc");
        want.extend_from_slice(&9u64.to_be_bytes());
        want.extend_from_slice(&0u32.to_be_bytes());
        assert_eq!(got, want);
        // Replaying the same WAL again rewrites the same file.
        keep(dir.path(), "orders", 3, &entries[..1]).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
