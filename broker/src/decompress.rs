//! Bounded decompression of record batches. The protocol crate's own
//! decompressors trust the sizes in the data (a snappy header can ask for a
//! 4 GiB buffer); these stop at a limit, so one client cannot make the
//! broker allocate without bound.

use std::io::Read;

use bytes::{Buf, Bytes};
use kafka_protocol::records::Compression;

/// Most bytes one batch may decompress to.
pub const MAX_DECOMPRESSED: usize = 128 << 20;

const XERIAL_MAGIC: &[u8] = b"\x82SNAPPY\x00";
const XERIAL_HEADER_LEN: usize = 16;

pub fn decompress(input: &mut Bytes, compression: Compression) -> anyhow::Result<Bytes> {
    decompress_with_limit(input, compression, MAX_DECOMPRESSED)
}

pub fn decompress_with_limit(
    input: &mut Bytes,
    compression: Compression,
    limit: usize,
) -> anyhow::Result<Bytes> {
    let data = input.split_to(input.len());
    match compression {
        Compression::None => Ok(data),
        Compression::Gzip => read_bounded(flate2::read::MultiGzDecoder::new(data.reader()), limit),
        Compression::Lz4 => read_bounded(lz4::Decoder::new(data.reader())?, limit),
        Compression::Zstd => read_bounded(zstd::stream::read::Decoder::new(data.reader())?, limit),
        Compression::Snappy => snappy(&data, limit),
    }
}

fn read_bounded(reader: impl Read, limit: usize) -> anyhow::Result<Bytes> {
    let mut out = Vec::new();
    reader.take(limit as u64 + 1).read_to_end(&mut out)?;
    anyhow::ensure!(
        out.len() <= limit,
        "batch decompresses to more than {limit} bytes"
    );
    Ok(Bytes::from(out))
}

/// Kafka's snappy is either raw or in xerial's block framing.
fn snappy(data: &[u8], limit: usize) -> anyhow::Result<Bytes> {
    let raw = |block: &[u8], room: usize| -> anyhow::Result<Vec<u8>> {
        let len = snap::raw::decompress_len(block)?;
        anyhow::ensure!(len <= room, "batch decompresses to more than {limit} bytes");
        Ok(snap::raw::Decoder::new().decompress_vec(block)?)
    };
    if !data.starts_with(XERIAL_MAGIC) {
        return Ok(Bytes::from(raw(data, limit)?));
    }
    anyhow::ensure!(data.len() >= XERIAL_HEADER_LEN, "truncated snappy header");
    let mut rest = &data[XERIAL_HEADER_LEN..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        anyhow::ensure!(rest.len() >= 4, "truncated snappy block length");
        let n = rest.get_u32() as usize;
        anyhow::ensure!(n <= rest.len(), "truncated snappy block");
        let block = raw(&rest[..n], limit - out.len())?;
        out.extend_from_slice(&block);
        rest = &rest[n..];
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn gzip_bomb_is_refused() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![0u8; 4 << 20]).unwrap();
        let mut small = Bytes::from(enc.finish().unwrap());
        assert!(decompress_with_limit(&mut small.clone(), Compression::Gzip, 1 << 20).is_err());
        assert_eq!(
            decompress_with_limit(&mut small, Compression::Gzip, 8 << 20)
                .unwrap()
                .len(),
            4 << 20
        );
    }

    #[test]
    fn snappy_length_header_cannot_force_a_huge_buffer() {
        // A raw snappy stream whose varint header claims ~4 GiB.
        let mut lie = Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x0f, 0x00]);
        assert!(decompress(&mut lie, Compression::Snappy).is_err());
        let mut xerial = Vec::from(&b"\x82SNAPPY\x00\x00\x00\x00\x01\x00\x00\x00\x01"[..]);
        xerial.extend_from_slice(&6u32.to_be_bytes());
        xerial.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f, 0x00]);
        assert!(decompress(&mut Bytes::from(xerial), Compression::Snappy).is_err());
    }

    #[test]
    fn snappy_raw_and_framed_round_trip() {
        let body = b"hello hello hello hello".to_vec();
        let block = snap::raw::Encoder::new().compress_vec(&body).unwrap();
        assert_eq!(
            decompress(&mut Bytes::from(block.clone()), Compression::Snappy).unwrap(),
            body
        );
        let mut framed = Vec::from(&b"\x82SNAPPY\x00\x00\x00\x00\x01\x00\x00\x00\x01"[..]);
        for _ in 0..2 {
            framed.extend_from_slice(&(block.len() as u32).to_be_bytes());
            framed.extend_from_slice(&block);
        }
        assert_eq!(
            decompress(&mut Bytes::from(framed), Compression::Snappy)
                .unwrap()
                .len(),
            2 * body.len()
        );
    }
}
