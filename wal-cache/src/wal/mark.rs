//! The truncation mark: how far the log is truncated, in a small file of its
//! own (`TRUNCATED`), so recording it never needs room in the log. When the
//! disk is full, committed entries can still be truncated and their
//! segments freed, which is what lets the log write again.
//!
//! The file has two 512-byte slots, written alternately in place (no
//! allocation after creation) and fsynced: a torn write spoils at most the
//! slot being written, and the other still holds the previous mark.
//!
//! ```text
//! slot: magic "SHWT" | counter u64 | through u64 | crc32c u32 of the rest
//! ```

use std::{
    fs::{File, OpenOptions},
    io::{ErrorKind, Read},
    os::unix::fs::FileExt,
    path::Path,
};

const MAGIC: &[u8; 4] = b"SHWT";
const SLOT: u64 = 512;
const SLOT_LEN: usize = 24;

pub(super) struct Mark {
    file: File,
    counter: u64,
    through: u64,
}

fn encode(counter: u64, through: u64) -> [u8; SLOT_LEN] {
    let mut b = [0u8; SLOT_LEN];
    b[..4].copy_from_slice(MAGIC);
    b[4..12].copy_from_slice(&counter.to_le_bytes());
    b[12..20].copy_from_slice(&through.to_le_bytes());
    let crc = crc32c::crc32c(&b[..20]);
    b[20..24].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Option<(u64, u64)> {
    let b = b.get(..SLOT_LEN)?;
    if &b[..4] != MAGIC || crc32c::crc32c(&b[..20]).to_le_bytes() != b[20..24] {
        return None;
    }
    let mut c = [0u8; 8];
    c.copy_from_slice(&b[4..12]);
    let mut t = [0u8; 8];
    t.copy_from_slice(&b[12..20]);
    Some((u64::from_le_bytes(c), u64::from_le_bytes(t)))
}

impl Mark {
    /// Open the mark of `dir`, creating it (truncated through 0).
    pub fn open(dir: &Path) -> std::io::Result<Mark> {
        let path = dir.join("TRUNCATED");
        let mut file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)?;
                f.write_all_at(&[0u8; 2 * SLOT as usize], 0)?;
                f.sync_all()?;
                super::segments::fsync_dir(dir)?;
                f
            }
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let slots = [0, SLOT as usize].map(|at| bytes.get(at..).and_then(decode));
        let (counter, through) = slots.into_iter().flatten().max().unwrap_or((0, 0));
        Ok(Mark {
            file,
            counter,
            through,
        })
    }

    pub fn through(&self) -> u64 {
        self.through
    }

    /// Record a new mark durably.
    pub fn set(&mut self, through: u64) -> std::io::Result<()> {
        let counter = self.counter + 1;
        self.file
            .write_all_at(&encode(counter, through), (counter % 2) * SLOT)?;
        self.file.sync_data()?;
        self.counter = counter;
        self.through = through;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_newest_readable_slot_wins() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Mark::open(dir.path()).unwrap();
        assert_eq!(m.through(), 0);
        m.set(5).unwrap();
        m.set(9).unwrap();
        assert_eq!(Mark::open(dir.path()).unwrap().through(), 9);
        // A torn write of the newest slot leaves the one before.
        // The second write (counter 2) went to slot 0.
        let path = dir.path().join("TRUNCATED");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[14] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(Mark::open(dir.path()).unwrap().through(), 5);
    }
}
