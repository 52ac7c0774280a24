//! The on-disk format of WAL segments (sans-io: bytes in, values out).
//!
//! A segment file starts with a [`SEGMENT_HEADER_LEN`]-byte header, then
//! records back to back:
//!
//! ```text
//! segment header: magic "SHOALWAL" | version u32 | crc32c u32 of the
//!                 rest | number u64 | first_seq u64 | prev_last_seq u64
//! record:         payload_len u32 | kind u8 | 3 zero bytes | seq u64 |
//!                 durable u64 | payload crc32c u32 | header crc32c u32 |
//!                 payload
//! ```
//!
//! `durable` is the highest seq that was fsynced when the record's group
//! was written. It tells a torn last group (never acknowledged, so dropped)
//! from damage to records that were durable (reported): a damaged record
//! is durable exactly when a later readable record says so.
//!
//! All integers are little-endian. The record header has its own checksum,
//! so a damaged payload still tells its length and sequence number (the
//! entry is reported as corrupt and reading goes on), while a damaged
//! header ends what can be read at that point.
//!
//! Seqs strictly increase through a segment. A record whose seq does not
//! is left over from the file's earlier life (segments are recycled) and
//! ends the segment.

/// Bytes of the segment header.
pub(super) const SEGMENT_HEADER_LEN: usize = 40;
/// Bytes of a record header.
pub(super) const RECORD_HEADER_LEN: usize = 32;

const MAGIC: &[u8; 8] = b"SHOALWAL";
const VERSION: u32 = 1;

/// What a record holds; the format leaves room for other kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// An appended entry: the caller's payload.
    Entry = 1,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Entry),
            _ => None,
        }
    }
}

/// A segment's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SegmentHeader {
    /// Counts the segments ever started in this log: their order.
    pub number: u64,
    /// The seq of the segment's first record.
    pub first_seq: u64,
    /// The last seq that was durable when this segment was started. Records
    /// of earlier segments above it were never acknowledged (a failed
    /// group), so replay ignores them; an earlier segment that cannot be
    /// read up to it has lost durable records.
    pub prev_last_seq: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut out = [0u8; SEGMENT_HEADER_LEN];
        out[..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[16..24].copy_from_slice(&self.number.to_le_bytes());
        out[24..32].copy_from_slice(&self.first_seq.to_le_bytes());
        out[32..40].copy_from_slice(&self.prev_last_seq.to_le_bytes());
        let crc = header_crc(&out);
        out[12..16].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// `None` for anything that is not a valid header: a spare segment
    /// (zeroed header), a torn header write, another file.
    pub fn decode(bytes: &[u8]) -> Option<SegmentHeader> {
        let h = bytes.get(..SEGMENT_HEADER_LEN)?;
        if &h[..8] != MAGIC || u32_at(h, 8) != VERSION || header_crc(h) != u32_at(h, 12) {
            return None;
        }
        Some(SegmentHeader {
            number: u64_at(h, 16),
            first_seq: u64_at(h, 24),
            prev_last_seq: u64_at(h, 32),
        })
    }
}

/// crc32c of a segment header without its crc field.
fn header_crc(h: &[u8]) -> u32 {
    let c = crc32c::crc32c(&h[..12]);
    crc32c::crc32c_append(c, &h[16..SEGMENT_HEADER_LEN])
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RecordHeader {
    pub kind: Kind,
    pub seq: u64,
    pub durable: u64,
    pub payload_len: u32,
    pub payload_crc: u32,
}

impl RecordHeader {
    /// Append header and payload of one entry record to `out`.
    pub fn write(seq: u64, durable: u64, payload: &[u8], out: &mut Vec<u8>) {
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let mut h = [0u8; RECORD_HEADER_LEN];
        h[..4].copy_from_slice(&len.to_le_bytes());
        h[4] = Kind::Entry as u8;
        h[8..16].copy_from_slice(&seq.to_le_bytes());
        h[16..24].copy_from_slice(&durable.to_le_bytes());
        h[24..28].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
        let crc = crc32c::crc32c(&h[..28]);
        h[28..32].copy_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(payload);
    }

    /// `None` when the header's own checksum (or its kind) is wrong.
    pub fn decode(bytes: &[u8]) -> Option<RecordHeader> {
        let h = bytes.get(..RECORD_HEADER_LEN)?;
        if crc32c::crc32c(&h[..28]) != u32_at(h, 28) || h[5..8] != [0, 0, 0] {
            return None;
        }
        Some(RecordHeader {
            kind: Kind::from_byte(h[4])?,
            seq: u64_at(h, 8),
            durable: u64_at(h, 16),
            payload_len: u32_at(h, 0),
            payload_crc: u32_at(h, 24),
        })
    }

    pub fn payload_ok(&self, payload: &[u8]) -> bool {
        crc32c::crc32c(payload) == self.payload_crc
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn headers_round_trip_and_reject_damage() {
        let h = SegmentHeader {
            number: 3,
            first_seq: 7,
            prev_last_seq: 6,
        };
        let mut bytes = h.encode();
        assert_eq!(SegmentHeader::decode(&bytes), Some(h));
        bytes[25] ^= 1;
        assert_eq!(SegmentHeader::decode(&bytes), None);
        assert_eq!(SegmentHeader::decode(&[0u8; SEGMENT_HEADER_LEN]), None);

        let mut out = Vec::new();
        RecordHeader::write(42, 41, b"payload", &mut out);
        assert_eq!(out.len(), RECORD_HEADER_LEN + 7);
        let r = RecordHeader::decode(&out).unwrap();
        assert_eq!(
            (r.kind, r.seq, r.durable, r.payload_len),
            (Kind::Entry, 42, 41, 7)
        );
        assert!(r.payload_ok(&out[RECORD_HEADER_LEN..]));
        let mut damaged = out.clone();
        damaged[RECORD_HEADER_LEN] ^= 1;
        let r = RecordHeader::decode(&damaged).unwrap();
        assert!(!r.payload_ok(&damaged[RECORD_HEADER_LEN..]));
        damaged[9] ^= 1;
        assert_eq!(RecordHeader::decode(&damaged), None);
    }
}
