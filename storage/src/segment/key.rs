//! Object key layouts (DESIGN §5).

/// Key of a broker flush file:
/// `segments/<yyyy>/<mm>/<dd>/<hh>/<broker>-<id:020>.parquet`, with the
/// hour taken in UTC from `unix_ms`. Zero-padding `id` makes keys of one
/// broker sort in write order.
pub fn segment_key(broker_id: u64, id: u64, unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let hour = secs.rem_euclid(86_400) / 3600;
    format!("segments/{year:04}/{month:02}/{day:02}/{hour:02}/{broker_id}-{id:020}.parquet")
}

/// Key of a compacted file:
/// `streams/<stream>/shard=<n>/<first:020>-<last:020>-g<epoch>-<n>.parquet`
/// (hive-style `shard=` so engines can prune by directory). The
/// generation (the compaction lease epoch and a counter within it) keeps a
/// rewrite of the same offsets from colliding with a file still in its
/// grace period.
pub fn compacted_key(
    stream: &str,
    shard: i32,
    (first_offset, last_offset): (i64, i64),
    (epoch, n): (u64, u64),
) -> String {
    format!(
        "streams/{stream}/shard={shard}/{first_offset:020}-{last_offset:020}-g{epoch}-{n}.parquet"
    )
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01,
/// after Howard Hinnant's `civil_from_days`; avoids a date-library
/// dependency for one conversion.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_key_layout() {
        // 2024-02-29T23:59:59.999Z, a leap day.
        assert_eq!(
            segment_key(7, 42, 1_709_251_199_999),
            "segments/2024/02/29/23/7-00000000000000000042.parquet"
        );
        assert_eq!(
            segment_key(0, u64::MAX, 0),
            "segments/1970/01/01/00/0-18446744073709551615.parquet"
        );
        // Before the epoch rounds down, not towards zero.
        assert_eq!(
            segment_key(1, 1, -1),
            "segments/1969/12/31/23/1-00000000000000000001.parquet"
        );
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(civil_from_days(-719_468), (0, 3, 1));
    }

    #[test]
    fn compacted_key_layout() {
        assert_eq!(
            compacted_key("orders", 3, (0, 99), (7, 2)),
            "streams/orders/shard=3/00000000000000000000-00000000000000000099-g7-2.parquet"
        );
    }
}
