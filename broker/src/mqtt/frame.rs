//! Framing: cut whole MQTT packets out of a byte stream.
//!
//! The codec decodes only complete packets, so this layer reads the fixed
//! header's remaining length first and waits until that many bytes are
//! buffered. The maximum packet size is checked on the length field, before
//! any buffer grows to hold the packet.

use bytes::{Buf, Bytes, BytesMut};

/// A complete packet: its first byte and its body (exactly `remaining
/// length` bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub first_byte: u8,
    pub body: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("the remaining length field is longer than four bytes")]
    BadLength,
    #[error("a packet of {size} bytes is over the limit of {max}")]
    TooLarge { size: usize, max: usize },
}

/// The next whole packet in `buf`, if it is all there; consumes it.
/// `max` bounds the whole packet (fixed header included), as MQTT 5's
/// Maximum Packet Size does.
pub(crate) fn next(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
    let Some(&first_byte) = buf.first() else {
        return Ok(None);
    };
    let mut remaining: usize = 0;
    let mut header_len = 1;
    loop {
        let Some(&b) = buf.get(header_len) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << (7 * (header_len - 1));
        header_len += 1;
        if b & 0x80 == 0 {
            break;
        }
        if header_len > 4 {
            return Err(FrameError::BadLength);
        }
    }
    let size = header_len + remaining;
    if size > max {
        return Err(FrameError::TooLarge { size, max });
    }
    if buf.len() < size {
        // Reserve what the packet still needs (bounded by `max` above), so
        // a large body is read without repeated reallocation.
        buf.reserve(size - buf.len());
        return Ok(None);
    }
    buf.advance(header_len);
    let body = buf.split_to(remaining).freeze();
    Ok(Some(Frame { first_byte, body }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_the_whole_packet() {
        let mut buf = BytesMut::new();
        assert!(next(&mut buf, 100).unwrap().is_none());
        buf.extend_from_slice(&[0x30]);
        assert!(next(&mut buf, 100).unwrap().is_none());
        buf.extend_from_slice(&[0x05, 0, 1, b'a']);
        assert!(next(&mut buf, 100).unwrap().is_none());
        buf.extend_from_slice(&[b'x', b'y', 0xc0]);
        let f = next(&mut buf, 100).unwrap().unwrap();
        assert_eq!(f.first_byte, 0x30);
        assert_eq!(&f.body[..], &[0, 1, b'a', b'x', b'y']);
        // The next packet's first byte stays.
        assert_eq!(&buf[..], &[0xc0]);
    }

    #[test]
    fn multi_byte_lengths() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[0x30, 0x80, 0x01]);
        buf.extend_from_slice(&[7u8; 128]);
        let f = next(&mut buf, 1000).unwrap().unwrap();
        assert_eq!(f.body.len(), 128);
        assert!(buf.is_empty());
    }

    #[test]
    fn refuses_oversized_packets_before_their_bodies_arrive() {
        // 268,435,455 bytes announced in four length bytes; nothing else.
        let mut buf = BytesMut::from(&[0x30, 0xff, 0xff, 0xff, 0x7f][..]);
        assert_eq!(
            next(&mut buf, 1 << 20),
            Err(FrameError::TooLarge {
                size: 268_435_460,
                max: 1 << 20
            })
        );
        assert!(buf.capacity() < 1 << 20);
    }

    #[test]
    fn refuses_a_fifth_length_byte() {
        let mut buf = BytesMut::from(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert_eq!(next(&mut buf, usize::MAX), Err(FrameError::BadLength));
    }
}
