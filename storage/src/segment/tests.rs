#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding};
use parquet::file::metadata::{KeyValue, ParquetMetaData};
use parquet::file::properties::WriterProperties;
use parquet::file::statistics::Statistics;

use super::*;
use crate::{Error, Header, ObjectStorage, Record};

fn record(offset: i64, ts: i64) -> Record {
    Record {
        offset,
        timestamp_ms: ts,
        key: Some(Bytes::from(format!("k{offset}"))),
        value: Some(Bytes::from(vec![offset as u8; (offset % 7) as usize])),
        headers: vec![],
        producer_id: None,
        producer_epoch: None,
        sequence: None,
    }
}

/// Records covering every nullable field in both states.
fn varied_records(first: i64, n: i64) -> Vec<Record> {
    (first..first + n)
        .map(|o| {
            let mut r = record(o, 1_700_000_000_000 + (o * 37) % 1000);
            match o % 4 {
                0 => {
                    r.key = None;
                    r.value = None;
                }
                1 => {
                    r.headers = vec![
                        Header {
                            key: "h1".into(),
                            value: Some(Bytes::from_static(b"v1")),
                        },
                        Header {
                            key: "nullable".into(),
                            value: None,
                        },
                        Header {
                            key: String::new(),
                            value: Some(Bytes::new()),
                        },
                    ];
                    r.producer_id = Some(1000 + o);
                    r.producer_epoch = Some(3);
                    r.sequence = Some(o as i32);
                }
                2 => {
                    r.value = Some(Bytes::new());
                    r.producer_id = Some(-1);
                }
                _ => {
                    r.headers = vec![Header {
                        key: "only".into(),
                        value: None,
                    }];
                }
            }
            r
        })
        .collect()
}

fn shard(stream: &str, shard: i32, records: Vec<Record>) -> ShardRows {
    ShardRows {
        stream: stream.into(),
        shard,
        records,
    }
}

fn opts(max_rows: usize) -> SegmentOptions {
    SegmentOptions {
        max_rows_per_row_group: max_rows,
        ..SegmentOptions::default()
    }
}

async fn stored(bytes: Bytes) -> (ObjectStorage, Arc<ParquetMetaData>) {
    let store = ObjectStorage::from_url("memory://").unwrap();
    store.put_create("seg.parquet", bytes).await.unwrap();
    let (footer, _) = fetch_footer(&store, "seg.parquet").await.unwrap();
    let meta = decode_footer(&footer).unwrap();
    (store, meta)
}

#[tokio::test]
async fn round_trip_many_shards_with_splitting() {
    let input = vec![
        shard("orders", 0, varied_records(0, 10)),
        shard("orders", 1, varied_records(100, 3)),
        shard("audit", 7, varied_records(5, 1)),
        shard("orders", 2, vec![]),
    ];
    let seg = encode_segment(input.clone(), &opts(4)).unwrap();

    // audit/7 (1 row), orders/0 (4+4+2 rows), orders/1 (3 rows).
    let layout: Vec<_> = seg
        .ranges
        .iter()
        .map(|r| {
            (
                r.stream.as_str(),
                r.shard,
                r.row_group,
                r.first_offset,
                r.last_offset,
            )
        })
        .collect();
    assert_eq!(
        layout,
        vec![
            ("audit", 7, 0, 5, 5),
            ("orders", 0, 1, 0, 3),
            ("orders", 0, 2, 4, 7),
            ("orders", 0, 3, 8, 9),
            ("orders", 1, 4, 100, 102),
        ]
    );

    let (store, meta) = stored(seg.bytes.clone()).await;
    assert_eq!(meta.num_row_groups(), seg.ranges.len());
    for s in &input {
        let mut got = Vec::new();
        for r in seg
            .ranges
            .iter()
            .filter(|r| r.stream == s.stream && r.shard == s.shard)
        {
            let rows = read_row_group(&store, "seg.parquet", meta.clone(), r.row_group as usize)
                .await
                .unwrap();
            assert_eq!(rows.len() as u64, r.record_count);
            got.extend(rows);
        }
        assert_eq!(got, s.records, "{}/{}", s.stream, s.shard);
    }
}

#[tokio::test]
async fn a_whole_object_in_memory_decodes_like_range_reads() {
    let input = vec![
        shard("a", 0, varied_records(0, 40)),
        shard("b", 3, varied_records(100, 7)),
    ];
    let seg = encode_segment(input, &opts(16)).unwrap();
    let (store, meta) = stored(seg.bytes.clone()).await;
    let footer = footer_in("seg.parquet", &seg.bytes).unwrap();
    let in_memory = decode_footer(&footer).unwrap();
    assert_eq!(in_memory.num_row_groups(), meta.num_row_groups());
    for r in &seg.ranges {
        let rg = r.row_group as usize;
        let ranged = read_row_group(&store, "seg.parquet", meta.clone(), rg)
            .await
            .unwrap();
        let whole = decode_row_group_in("seg.parquet", in_memory.clone(), rg, &seg.bytes)
            .await
            .unwrap();
        assert_eq!(whole, ranged);
    }
    // A cut object is an error, not a panic.
    let cut = seg.bytes.slice(..seg.bytes.len() / 2);
    assert!(footer_in("seg.parquet", &cut).is_err());
    let short = seg.bytes.slice(..8);
    assert!(
        decode_row_group_in("seg.parquet", in_memory, 0, &short)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn rows_are_sorted_and_shards_merged() {
    let mut unsorted = varied_records(0, 6);
    unsorted.reverse();
    let input = vec![
        shard("b", 2, vec![record(1, 10)]),
        shard("b", 1, unsorted),
        shard("a", 9, vec![record(3, 30), record(1, 10)]),
        // Same shard again: merged into a/9.
        shard("a", 9, vec![record(2, 20)]),
    ];
    let seg = encode_segment(input, &SegmentOptions::default()).unwrap();
    let keys: Vec<_> = seg
        .ranges
        .iter()
        .map(|r| (r.stream.as_str(), r.shard, r.first_offset, r.last_offset))
        .collect();
    assert_eq!(keys, vec![("a", 9, 1, 3), ("b", 1, 0, 5), ("b", 2, 1, 1)]);

    let (store, meta) = stored(seg.bytes).await;
    let a9 = read_row_group(&store, "seg.parquet", meta.clone(), 0)
        .await
        .unwrap();
    assert_eq!(a9.iter().map(|r| r.offset).collect::<Vec<_>>(), [1, 2, 3]);
    let b1 = read_row_group(&store, "seg.parquet", meta, 1)
        .await
        .unwrap();
    assert_eq!(b1, varied_records(0, 6));
}

#[test]
fn ranges_match_parquet_metadata() {
    let records: Vec<Record> = (0..10).map(|o| record(o, 5_000 - o * 10)).collect();
    let seg = encode_segment(vec![shard("s", 3, records)], &opts(6)).unwrap();
    assert!(seg.ranges.iter().all(|r| r.bytes > 0));
    let ranges: Vec<ShardRange> = seg
        .ranges
        .iter()
        .map(|r| ShardRange {
            bytes: 0,
            ..r.clone()
        })
        .collect();
    assert_eq!(
        ranges,
        vec![
            ShardRange {
                stream: "s".into(),
                shard: 3,
                row_group: 0,
                first_offset: 0,
                last_offset: 5,
                record_count: 6,
                min_timestamp_ms: 4_950,
                max_timestamp_ms: 5_000,
                bytes: 0,
            },
            ShardRange {
                stream: "s".into(),
                shard: 3,
                row_group: 1,
                first_offset: 6,
                last_offset: 9,
                record_count: 4,
                min_timestamp_ms: 4_910,
                max_timestamp_ms: 4_940,
                bytes: 0,
            },
        ]
    );

    let footer = footer_of(&seg.bytes);
    let meta = decode_footer(&footer).unwrap();
    let leaf = |name: &str| {
        meta.file_metadata()
            .schema_descr()
            .columns()
            .iter()
            .position(|c| c.path().string() == name)
            .unwrap()
    };
    let (offset, ts) = (leaf("offset"), leaf("timestamp"));
    for (rg, range) in meta.row_groups().iter().zip(&seg.ranges) {
        // Engines skip row groups with these; they must be exact.
        match rg.column(offset).statistics() {
            Some(Statistics::Int64(s)) => {
                assert_eq!(s.min_opt(), Some(&range.first_offset));
                assert_eq!(s.max_opt(), Some(&range.last_offset));
            }
            other => panic!("offset statistics: {other:?}"),
        }
        match rg.column(ts).statistics() {
            Some(Statistics::Int64(s)) => {
                assert_eq!(s.min_opt(), Some(&range.min_timestamp_ms));
                assert_eq!(s.max_opt(), Some(&range.max_timestamp_ms));
            }
            other => panic!("timestamp statistics: {other:?}"),
        }
        let sorting: Vec<_> = rg
            .sorting_columns()
            .unwrap()
            .iter()
            .map(|c| c.column_idx)
            .collect();
        assert_eq!(sorting, [0, 1, 2]);
        for c in rg.columns() {
            assert!(matches!(c.compression(), Compression::ZSTD(_)));
            // Plain Parquet v1 encodings only, readable by every engine.
            for e in c.encodings() {
                assert!(
                    matches!(
                        e,
                        Encoding::PLAIN
                            | Encoding::RLE
                            | Encoding::RLE_DICTIONARY
                            | Encoding::PLAIN_DICTIONARY
                    ),
                    "{}: {e:?}",
                    c.column_path()
                );
            }
        }
    }
    let kv = meta.file_metadata().key_value_metadata().unwrap();
    assert!(
        kv.iter()
            .any(|kv| kv.key == "shoal.format_version" && kv.value.as_deref() == Some("1"))
    );
}

#[test]
fn empty_input_is_a_valid_empty_segment() {
    let seg = encode_segment(vec![shard("s", 0, vec![])], &SegmentOptions::default()).unwrap();
    assert!(seg.ranges.is_empty());
    let meta = decode_footer(&footer_of(&seg.bytes)).unwrap();
    assert_eq!(meta.num_row_groups(), 0);
}

#[test]
fn bad_input_is_rejected() {
    let dup = vec![shard("s", 0, vec![record(1, 0), record(1, 0)])];
    assert!(matches!(
        encode_segment(dup, &SegmentOptions::default()),
        Err(Error::Encode { .. })
    ));
    let one = || vec![shard("s", 0, vec![record(1, 0)])];
    assert!(matches!(
        encode_segment(one(), &opts(0)),
        Err(Error::Encode { .. })
    ));
    let bad_level = SegmentOptions {
        zstd_level: 1000,
        ..SegmentOptions::default()
    };
    assert!(matches!(
        encode_segment(one(), &bad_level),
        Err(Error::Encode { .. })
    ));
}

/// The footer as `fetch_footer` would return it, cut from whole bytes.
fn footer_of(bytes: &Bytes) -> Bytes {
    let n = bytes.len();
    let len = u32::from_le_bytes(bytes[n - 8..n - 4].try_into().unwrap()) as usize;
    bytes.slice(n - 8 - len..)
}

fn plain_parquet(kv: Option<Vec<KeyValue>>) -> Bytes {
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(Int64Array::from(vec![1, 2, 3]))],
    )
    .unwrap();
    let props = WriterProperties::builder()
        .set_key_value_metadata(kv)
        .build();
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, schema, Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    Bytes::from(buf)
}

#[test]
fn decode_footer_rejects_foreign_and_garbage_footers() {
    let reject = |footer: Bytes| {
        assert!(
            matches!(decode_footer(&footer), Err(Error::InvalidFooter { .. })),
            "accepted {footer:?}"
        );
    };
    reject(Bytes::new());
    reject(Bytes::from_static(b"PAR1"));
    reject(Bytes::from_static(b"\x00\x00\x00\x00PAR1"));
    reject(Bytes::from_static(b"\xff\xff\xff\x7fPAR1"));
    reject(Bytes::from_static(b"garbage!\x04\x00\x00\x00PAR1"));
    reject(Bytes::from(vec![0xAB; 4096]));
    // Valid Parquet, but not a Shoal segment.
    reject(footer_of(&plain_parquet(None)));
    // A Shoal segment from a future format.
    reject(footer_of(&plain_parquet(Some(vec![KeyValue::new(
        "shoal.format_version".into(),
        "2".to_owned(),
    )]))));

    // Corrupt a real footer byte by byte: any outcome but a panic is fine.
    let seg = encode_segment(
        vec![shard("s", 0, varied_records(0, 20))],
        &SegmentOptions::default(),
    )
    .unwrap();
    let footer = footer_of(&seg.bytes);
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..300 {
        let mut bad = footer.to_vec();
        for _ in 0..4 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let at = (state % (bad.len() as u64 - 8)) as usize;
            bad[at] = (state >> 32) as u8;
        }
        let _ = decode_footer(&Bytes::from(bad));
    }
}

#[tokio::test]
async fn fetch_footer_rejects_non_parquet_objects() {
    let store = ObjectStorage::from_url("memory://").unwrap();
    store
        .put_create("tiny", Bytes::from_static(b"PAR1"))
        .await
        .unwrap();
    store
        .put_create("text", Bytes::from(vec![b'x'; 100]))
        .await
        .unwrap();
    store
        .put_create("liar", Bytes::from_static(b"PAR1\x00\xff\x00\x00\x00PAR1"))
        .await
        .unwrap();
    for key in ["tiny", "text", "liar"] {
        assert!(
            matches!(
                fetch_footer(&store, key).await,
                Err(Error::CorruptSegment { .. })
            ),
            "{key}"
        );
    }
    assert!(matches!(
        fetch_footer(&store, "missing").await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn large_footer_takes_a_second_read() {
    // Enough row groups that the metadata outgrows the 64 KiB prefetch.
    let shards = (0..400)
        .map(|s| shard("s", s, vec![record(0, 0)]))
        .collect();
    let seg = encode_segment(shards, &SegmentOptions::default()).unwrap();
    let store = ObjectStorage::from_url("memory://").unwrap();
    store.put_create("big", seg.bytes.clone()).await.unwrap();
    let before = store.stats().gets;
    let (footer, size) = fetch_footer(&store, "big").await.unwrap();
    assert!(
        footer.len() > 64 * 1024,
        "footer only {} bytes",
        footer.len()
    );
    assert_eq!(store.stats().gets - before, 2);
    assert_eq!(size, seg.bytes.len() as u64);
    assert_eq!(footer, footer_of(&seg.bytes));
    let meta = decode_footer(&footer).unwrap();
    let rows = read_row_group(&store, "big", meta, 399).await.unwrap();
    assert_eq!(rows, vec![record(0, 0)]);
}

#[tokio::test]
async fn damaged_objects_error_instead_of_panicking() {
    let seg = encode_segment(
        vec![
            shard("s", 0, varied_records(0, 50)),
            shard("s", 1, varied_records(0, 50)),
        ],
        &SegmentOptions::default(),
    )
    .unwrap();
    let (store, meta) = stored(seg.bytes.clone()).await;
    let rg1 = meta.row_group(1);
    let rg1_start = rg1
        .columns()
        .iter()
        .map(|c| c.byte_range().0)
        .min()
        .unwrap() as usize;

    let end = rg1
        .columns()
        .iter()
        .map(|c| c.byte_range().0 + c.byte_range().1)
        .max()
        .unwrap() as usize;

    // Truncated inside row group 1's last column chunk.
    store
        .put_create("truncated", seg.bytes.slice(..end - 10))
        .await
        .unwrap();
    let err = read_row_group(&store, "truncated", meta.clone(), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::ShortRead { ref key, .. } if key == "truncated"),
        "{err}"
    );
    // Row group 0 is intact in the truncated object.
    assert_eq!(
        read_row_group(&store, "truncated", meta.clone(), 0)
            .await
            .unwrap(),
        varied_records(0, 50)
    );
    // Cut before the columns the reader needs: the backend refuses the range.
    store
        .put_create("cut", seg.bytes.slice(..rg1_start + 10))
        .await
        .unwrap();
    assert!(
        read_row_group(&store, "cut", meta.clone(), 1)
            .await
            .is_err()
    );

    // Same length, row group 1 overwritten.
    let mut scrambled = seg.bytes.to_vec();
    for (i, b) in scrambled[rg1_start..end].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31) ^ 0x5a;
    }
    store
        .put_create("scrambled", Bytes::from(scrambled))
        .await
        .unwrap();
    assert!(
        read_row_group(&store, "scrambled", meta.clone(), 1)
            .await
            .is_err()
    );

    assert!(matches!(
        read_row_group(&store, "seg.parquet", meta, 2).await,
        Err(Error::RowGroupOutOfRange {
            row_group: 2,
            count: 2,
            ..
        })
    ));
}
