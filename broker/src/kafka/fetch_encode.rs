//! A Fetch response encoded without copying its records: the encoded
//! fields and the partitions' record batches as pieces to write in order.
//!
//! A catch-up fetch carries tens of MiB of batches that are already in
//! their wire encoding (in the cache or the tail). Copying them into one
//! response buffer costs as much as sending them, and the client waits for
//! the whole copy before the first byte leaves. Instead the response is
//! encoded twice with the records left out, once with every batch-carrying
//! partition's records null and once empty; the two encodings differ only
//! in those partitions' records length prefixes, which locates them. The
//! pieces are then: the fields up to a prefix, the real prefix, the batches
//! (the same `Bytes`, not copied), and so on. Pure: no I/O.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, FetchResponse, ResponseHeader};
use kafka_protocol::protocol::Encodable;

/// The first Fetch version with flexible (compact) encodings.
const FIRST_FLEXIBLE_VERSION: i16 = 12;

/// `resp` as a length-prefixed response frame, in pieces. Should the two
/// encodings not line up as expected, the frame is encoded whole (one
/// piece, records copied) instead.
pub(crate) fn encode_fetch_response(
    correlation_id: i32,
    version: i16,
    mut resp: FetchResponse,
) -> Result<Vec<Bytes>, String> {
    let mut taken: Vec<Bytes> = Vec::new();
    let mut at: Vec<(usize, usize)> = Vec::new();
    for (ti, t) in resp.responses.iter_mut().enumerate() {
        for (pi, p) in t.partitions.iter_mut().enumerate() {
            if let Some(r) = p.records.take_if(|r| !r.is_empty()) {
                taken.push(r);
                at.push((ti, pi));
            }
        }
    }
    let null = encode_frame(correlation_id, version, &resp)?;
    // The same partitions now with empty records.
    for &(ti, pi) in &at {
        resp.responses[ti].partitions[pi].records = Some(Bytes::new());
    }
    let empty = encode_frame(correlation_id, version, &resp)?;
    let Some(markers) = record_markers(&null, &empty, version, taken.len()) else {
        tracing::warn!(
            version,
            "fetch response fields did not line up; encoding it whole"
        );
        for (&(ti, pi), r) in at.iter().zip(taken) {
            resp.responses[ti].partitions[pi].records = Some(r);
        }
        let mut frame = encode_frame(correlation_id, version, &resp)?;
        let len = (frame.len() - 4) as i32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        return Ok(vec![frame.freeze()]);
    };
    Ok(splice(null, &markers, taken, version))
}

fn encode_frame(
    correlation_id: i32,
    version: i16,
    resp: &FetchResponse,
) -> Result<BytesMut, String> {
    let mut buf = BytesMut::with_capacity(256);
    buf.put_i32(0);
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(&mut buf, ApiKey::Fetch.response_header_version(version))
        .map_err(|e| e.to_string())?;
    resp.encode(&mut buf, version).map_err(|e| e.to_string())?;
    Ok(buf)
}

/// Where each left-out records field starts, in order: the places the two
/// encodings differ, one byte each in compact encodings (length 0 vs 1),
/// four in the older ones (-1 vs 0).
fn record_markers(null: &[u8], empty: &[u8], version: i16, count: usize) -> Option<Vec<usize>> {
    if null.len() != empty.len() {
        return None;
    }
    let width = marker_width(version);
    let diffs: Vec<usize> = (0..null.len()).filter(|&i| null[i] != empty[i]).collect();
    if diffs.len() != count * width {
        return None;
    }
    let mut starts = Vec::with_capacity(count);
    for group in diffs.chunks(width) {
        let start = group[0];
        if group.iter().enumerate().any(|(j, &i)| i != start + j) {
            return None;
        }
        starts.push(start);
    }
    Some(starts)
}

fn marker_width(version: i16) -> usize {
    if version >= FIRST_FLEXIBLE_VERSION {
        1
    } else {
        4
    }
}

/// The frame with each marker replaced by the real length prefix and the
/// records after it; the frame's own length fixed to match.
fn splice(mut frame: BytesMut, markers: &[usize], records: Vec<Bytes>, version: i16) -> Vec<Bytes> {
    let width = marker_width(version);
    let prefixes: Vec<Vec<u8>> = records
        .iter()
        .map(|r| length_prefix(r.len(), version))
        .collect();
    let added: usize = records
        .iter()
        .zip(&prefixes)
        .map(|(r, p)| r.len() + p.len())
        .sum();
    let total = frame.len() - 4 - markers.len() * width + added;
    frame[..4].copy_from_slice(&(total as i32).to_be_bytes());
    let frame = frame.freeze();
    let mut pieces = Vec::with_capacity(2 * records.len() + 1);
    let mut from = 0;
    for ((&at, prefix), r) in markers.iter().zip(prefixes).zip(records) {
        let mut head = BytesMut::with_capacity(at - from + prefix.len());
        head.extend_from_slice(&frame[from..at]);
        head.extend_from_slice(&prefix);
        pieces.push(head.freeze());
        pieces.push(r);
        from = at + width;
    }
    pieces.push(frame.slice(from..));
    pieces
}

fn length_prefix(len: usize, version: i16) -> Vec<u8> {
    if version >= FIRST_FLEXIBLE_VERSION {
        // Compact bytes: unsigned varint of length + 1.
        let mut v = len as u64 + 1;
        let mut out = Vec::with_capacity(5);
        while v >= 0x80 {
            out.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
        out
    } else {
        (len as i32).to_be_bytes().to_vec()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use kafka_protocol::messages::TopicName;
    use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
    use kafka_protocol::protocol::StrBytes;

    use super::*;

    fn response(sizes: &[&[Option<usize>]], version: i16) -> FetchResponse {
        let topics = sizes
            .iter()
            .enumerate()
            .map(|(t, parts)| {
                FetchableTopicResponse::default()
                    .with_topic(TopicName(StrBytes::from_string(format!("topic-{t}"))))
                    .with_partitions(
                        parts
                            .iter()
                            .enumerate()
                            .map(|(p, size)| {
                                PartitionData::default()
                                    .with_partition_index(p as i32)
                                    .with_high_watermark(1000 + p as i64)
                                    .with_aborted_transactions(Some(Vec::new()))
                                    .with_records(size.map(|n| {
                                        Bytes::from(
                                            (0..n).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
                                        )
                                    }))
                            })
                            .collect(),
                    )
            })
            .collect();
        FetchResponse::default()
            .with_session_id(if version >= 7 { 7 } else { 0 })
            .with_responses(topics)
    }

    fn whole(correlation_id: i32, version: i16, resp: &FetchResponse) -> Vec<u8> {
        let mut buf = encode_frame(correlation_id, version, resp).unwrap();
        let len = (buf.len() - 4) as i32;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        buf.to_vec()
    }

    #[test]
    fn pieces_make_the_same_bytes_as_one_encoding_in_every_version() {
        let shapes: [&[&[Option<usize>]]; 4] = [
            &[&[Some(100), None, Some(0), Some(300)], &[Some(5)]],
            &[&[None, None]],
            &[
                &[Some(200_000)],
                &[],
                &[Some(1), Some(127), Some(128), Some(16_383)],
            ],
            &[],
        ];
        for version in 4..=12 {
            for shape in shapes {
                let resp = response(shape, version);
                let want = whole(42, version, &resp);
                let pieces = encode_fetch_response(42, version, resp).unwrap();
                let got: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
                assert_eq!(got, want, "version {version}, shape {shape:?}");
            }
        }
    }

    #[test]
    fn the_records_are_not_copied() {
        let resp = response(&[&[Some(4096), Some(10)]], 12);
        let originals: Vec<Bytes> = resp.responses[0]
            .partitions
            .iter()
            .map(|p| p.records.clone().unwrap())
            .collect();
        let pieces = encode_fetch_response(1, 12, resp).unwrap();
        for r in originals {
            assert!(
                pieces
                    .iter()
                    .any(|p| p.as_ptr() == r.as_ptr() && p.len() == r.len())
            );
        }
    }
}
