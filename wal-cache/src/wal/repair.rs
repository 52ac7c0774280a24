//! Finding and cutting a torn tail in fjall's newest journal file.
//!
//! This reads fjall 3's journal format (`<dir>/<id>.jnl`, see
//! `fjall::journal::entry`): a batch is a Start entry (item count, seqno),
//! that many Item or Clear entries, and an End entry holding the xxh3 of the
//! encoded items followed by the magic trailer. Only used when fjall has
//! already refused to open, so a format change makes this find nothing and
//! the original error stands.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufReader, Read, Write},
    path::{Path, PathBuf},
};

use xxhash_rust::xxh3::Xxh3;

use crate::error::{Error, Result};

const TAG_START: u8 = 1;
const TAG_ITEM: u8 = 2;
const TAG_END: u8 = 3;
const TAG_CLEAR: u8 = 4;
const END_MAGIC: [u8; 4] = [b'F', b'J', b'L', 3];

/// Item header after the tag: value type, compression, keyspace id (u64),
/// key length (u16), value length (u32), on-disk value length (u32).
const ITEM_HEADER: usize = 1 + 1 + 8 + 2 + 4 + 4;

/// Where the first bad batch of the newest journal starts.
#[derive(Debug)]
pub(super) struct TornTail {
    pub(super) journal: PathBuf,
    pub(super) offset: u64,
}

/// Scan the newest journal; `Some` if a batch in it is incomplete or fails
/// its checksum. Everything from that batch on was never fsynced (an fsync
/// covers all bytes before it), so it is the point to cut.
pub(super) fn find_torn_tail(dir: &Path) -> Result<Option<TornTail>> {
    let Some(journal) = newest_journal(dir)? else {
        return Ok(None);
    };
    let file = File::open(&journal).map_err(|source| io_err(&journal, source))?;
    let mut reader = Counting {
        inner: BufReader::new(file),
        pos: 0,
    };
    loop {
        let start = reader.pos;
        match batch_is_valid(&mut reader) {
            Ok(Some(true)) => continue,
            // End of data: the file ends or fjall's zero pre-allocation starts.
            Ok(None) => return Ok(None),
            Ok(Some(false)) => {
                return Ok(Some(TornTail {
                    journal,
                    offset: start,
                }));
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Ok(Some(TornTail {
                    journal,
                    offset: start,
                }));
            }
            Err(source) => return Err(io_err(&journal, source)),
        }
    }
}

/// Truncate the journal at the torn batch and make that durable.
pub(super) fn cut(torn: &TornTail) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(&torn.journal)
        .map_err(|source| io_err(&torn.journal, source))?;
    file.set_len(torn.offset)
        .and_then(|()| file.sync_all())
        .map_err(|source| io_err(&torn.journal, source))
}

fn newest_journal(dir: &Path) -> Result<Option<PathBuf>> {
    let mut newest: Option<(u64, PathBuf)> = None;
    for dirent in std::fs::read_dir(dir).map_err(|source| io_err(dir, source))? {
        let dirent = dirent.map_err(|source| io_err(dir, source))?;
        let name = dirent.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".jnl"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if newest.as_ref().is_none_or(|(best, _)| id > *best) {
            newest = Some((id, dirent.path()));
        }
    }
    Ok(newest.map(|(_, path)| path))
}

/// Read one batch. `None` at the end of the data, `Some(valid)` otherwise.
/// A batch cut short surfaces as `UnexpectedEof`.
fn batch_is_valid(r: &mut impl Read) -> io::Result<Option<bool>> {
    let mut tag = [0u8; 1];
    if r.read(&mut tag)? == 0 || tag[0] == 0 {
        return Ok(None);
    }
    if tag[0] != TAG_START {
        return Ok(Some(false));
    }
    let item_count = u32::from_le_bytes(read_array(r)?);
    let _seqno: [u8; 8] = read_array(r)?;

    let mut hasher = HashWriter(Xxh3::new());
    for _ in 0..item_count {
        let [tag] = read_array::<1>(r)?;
        match tag {
            TAG_ITEM => {
                let header: [u8; ITEM_HEADER] = read_array(r)?;
                let key_len = u64::from(u16::from_le_bytes([header[10], header[11]]));
                let on_disk_len = u64::from(u32::from_le_bytes([
                    header[16], header[17], header[18], header[19],
                ]));
                hasher.0.update(&[TAG_ITEM]);
                hasher.0.update(&header);
                // Streamed through the hasher: lengths come from possibly
                // torn bytes and must not size an allocation.
                let body = key_len + on_disk_len;
                if io::copy(&mut r.by_ref().take(body), &mut hasher)? != body {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            TAG_CLEAR => {
                let keyspace: [u8; 8] = read_array(r)?;
                hasher.0.update(&[TAG_CLEAR]);
                hasher.0.update(&keyspace);
            }
            _ => return Ok(Some(false)),
        }
    }

    let [tag] = read_array::<1>(r)?;
    if tag != TAG_END {
        return Ok(Some(false));
    }
    let checksum = u64::from_le_bytes(read_array(r)?);
    let magic: [u8; 4] = read_array(r)?;
    Ok(Some(magic == END_MAGIC && checksum == hasher.0.digest()))
}

fn read_array<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

fn io_err(path: &Path, source: io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Tracks the read position so a bad batch's start offset is known.
struct Counting<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

struct HashWriter(Xxh3);

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
