//! Durable create-only writes for `file://` stores.
//!
//! object_store's local backend writes an object into the page cache and
//! syncs nothing, so a committed object could vanish with the power while
//! the WAL records it replaced were already truncated. Here the bytes go to
//! a staging file next to the target (`<name>#<digits>`, a name the local
//! backend's listings skip), are made durable, then linked to their key
//! (which fails if the key exists: create-only), and every directory up to
//! the store's root is fsynced.
//!
//! The staging file is written with `O_DIRECT`, one chunk at a time, then
//! synced once. A write through the page cache would be flushed in one
//! burst at the fsync, and a WAL on the same disk would wait behind the
//! whole object; chunk by chunk, it waits behind one chunk at most. Where
//! the file system refuses `O_DIRECT` (tmpfs), the page cache is used.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Bytes per direct write: what another writer of the disk may wait behind.
const CHUNK: usize = 1 << 20;
/// Direct I/O alignment (buffer address, length and file offset).
const ALIGN: usize = 4096;

/// What a create-only write found.
pub(crate) enum Created {
    Done,
    AlreadyExists,
}

/// Write `bytes` as `root/rel` unless it exists; durable on return.
pub(crate) fn create(root: &Path, rel: &str, bytes: &[u8]) -> std::io::Result<Created> {
    let path = root.join(rel);
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other(format!("{rel}: no parent directory")))?;
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| std::io::Error::other(format!("{rel}: no file name")))?;
    let staging = dir.join(format!("{name}#{}", rand::random::<u64>()));
    let written = (|| {
        write_durably(&staging, bytes)?;
        match std::fs::hard_link(&staging, &path) {
            Ok(()) => Ok(Created::Done),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(Created::AlreadyExists),
            Err(e) => Err(e),
        }
    })();
    let _ = std::fs::remove_file(&staging);
    if let Ok(Created::Done) = written {
        sync_dirs(root, &path)?;
    }
    written
}

/// Write `bytes` to a new file at `path` and sync it.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let direct = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path);
    let mut f = match direct {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
            let mut f = OpenOptions::new().write(true).create_new(true).open(path)?;
            f.write_all(bytes)?;
            return f.sync_data();
        }
        Err(e) => return Err(e),
    };
    // An aligned buffer: over-allocate and start at the first aligned byte.
    let mut buf = vec![0u8; CHUNK + ALIGN];
    let skew = (ALIGN - buf.as_ptr() as usize % ALIGN) % ALIGN;
    let aligned = &mut buf[skew..skew + CHUNK];
    for chunk in bytes.chunks(CHUNK) {
        // The last chunk is padded to the alignment; the file is cut to its
        // real length below.
        let len = chunk.len().div_ceil(ALIGN) * ALIGN;
        aligned[..chunk.len()].copy_from_slice(chunk);
        aligned[chunk.len()..len].fill(0);
        f.write_all(&aligned[..len])?;
    }
    f.set_len(bytes.len() as u64)?;
    f.sync_all()
}

/// fsync `path` and every directory from its parent up to `root`.
pub(crate) fn sync_file_and_dirs(root: &Path, path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()?;
    sync_dirs(root, path)
}

fn sync_dirs(root: &Path, path: &Path) -> std::io::Result<()> {
    let mut dir = path.parent();
    while let Some(d) = dir {
        File::open(d)?.sync_all()?;
        if d == root {
            break;
        }
        dir = d.parent();
    }
    Ok(())
}
