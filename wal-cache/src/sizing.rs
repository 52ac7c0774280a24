//! How large the cache tiers are: a byte count, a percentage of the
//! machine, or `auto` (a share of the memory this process may use and of
//! the free space where the disk tier lives).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// `auto` memory tier: this share of the memory available to the process
/// (the machine's, or a cgroup limit below it), within the bounds below.
pub const AUTO_MEMORY_PERCENT: u8 = 12;
/// `auto` disk tier: this share of the free space of the cache directory's
/// file system when the broker starts, within the bounds below.
pub const AUTO_DISK_PERCENT: u8 = 10;
const AUTO_MEMORY_BOUNDS: (u64, u64) = (64 * MIB, 32 * GIB);
const AUTO_DISK_BOUNDS: (u64, u64) = (256 * MIB, 1024 * GIB);
/// Used when the machine cannot be asked (no /proc, no statvfs).
const FALLBACK_MEMORY: u64 = 256 * MIB;
const FALLBACK_DISK: u64 = GIB;

/// A cache tier size as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheSize {
    /// A share of the machine, see [`AUTO_MEMORY_PERCENT`] and [`AUTO_DISK_PERCENT`].
    Auto,
    /// This percentage (1-90) of memory, or of free disk space.
    Percent(u8),
    /// Exactly this many bytes (0 turns a disk tier off).
    Bytes(u64),
}

/// Why a cache size did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid cache size {input:?}: expected auto, a percentage (1-90%) or a byte size (512MiB, 4GiB)"
)]
pub struct CacheSizeError {
    input: String,
}

impl FromStr for CacheSize {
    type Err = CacheSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CacheSizeError {
            input: s.to_owned(),
        };
        let t = s.trim();
        if t.eq_ignore_ascii_case("auto") {
            return Ok(CacheSize::Auto);
        }
        if let Some(p) = t.strip_suffix('%') {
            return match p.trim().parse::<u8>() {
                Ok(p @ 1..=90) => Ok(CacheSize::Percent(p)),
                _ => Err(bad()),
            };
        }
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => MIB,
            "g" | "gb" | "gib" => GIB,
            "t" | "tb" | "tib" => 1 << 40,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(CacheSize::Bytes).ok_or_else(bad)
    }
}

impl fmt::Display for CacheSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheSize::Auto => f.write_str("auto"),
            CacheSize::Percent(p) => write!(f, "{p}%"),
            CacheSize::Bytes(b) => write!(f, "{b}"),
        }
    }
}

impl CacheSize {
    /// Bytes for the memory tier on this machine.
    pub fn memory_bytes(self) -> u64 {
        resolve(self, AUTO_MEMORY_PERCENT, AUTO_MEMORY_BOUNDS, || {
            available_memory().unwrap_or(FALLBACK_MEMORY * 100 / u64::from(AUTO_MEMORY_PERCENT))
        })
    }

    /// Bytes for the disk tier kept in `dir` (or the nearest existing
    /// parent, before the directory is made).
    pub fn disk_bytes(self, dir: &Path) -> u64 {
        resolve(self, AUTO_DISK_PERCENT, AUTO_DISK_BOUNDS, || {
            free_space(dir).unwrap_or(FALLBACK_DISK * 100 / u64::from(AUTO_DISK_PERCENT))
        })
    }
}

fn resolve(size: CacheSize, auto: u8, bounds: (u64, u64), whole: impl FnOnce() -> u64) -> u64 {
    match size {
        CacheSize::Bytes(b) => b,
        CacheSize::Percent(p) => share(whole(), p),
        CacheSize::Auto => {
            let whole = whole();
            // The floor gives small machines a useful cache, but never more
            // than a quarter of what there is: on a nearly full disk the
            // write-ahead log needs the space more than the cache does.
            let floor = bounds.0.min(whole / 4);
            share(whole, auto).clamp(floor, bounds.1.max(floor))
        }
    }
}

fn share(whole: u64, percent: u8) -> u64 {
    u64::try_from(u128::from(whole) * u128::from(percent) / 100).unwrap_or(u64::MAX)
}

/// The smaller of the machine's memory and the cgroup's limit, if any.
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let total = parse_meminfo_total(&meminfo)?;
    let limit = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    Some(limit.map_or(total, |l| l.min(total)))
}

fn parse_meminfo_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line
        .trim_start_matches("MemTotal:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

fn free_space(dir: &Path) -> Option<u64> {
    let existing = dir.ancestors().find(|p| p.exists())?;
    let st = rustix::fs::statvfs(existing).ok()?;
    st.f_bavail.checked_mul(st.f_frsize)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!("auto".parse(), Ok(CacheSize::Auto));
        assert_eq!(" 25% ".parse(), Ok(CacheSize::Percent(25)));
        assert_eq!("512MiB".parse(), Ok(CacheSize::Bytes(512 * MIB)));
        assert_eq!("4g".parse(), Ok(CacheSize::Bytes(4 * GIB)));
        assert_eq!("0".parse(), Ok(CacheSize::Bytes(0)));
        for bad in [
            "",
            "0%",
            "95%",
            "-1",
            "12 parsecs",
            "99999999999999999999",
            "1e9",
        ] {
            assert!(bad.parse::<CacheSize>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn auto_is_a_bounded_share() {
        assert_eq!(resolve(CacheSize::Auto, 12, (64, 1000), || 100_000), 1000);
        assert_eq!(resolve(CacheSize::Auto, 12, (64, 1000), || 1000), 120);
        assert_eq!(resolve(CacheSize::Auto, 12, (64, 1000), || 400), 64);
        // A floor larger than a quarter of the whole gives way.
        assert_eq!(resolve(CacheSize::Auto, 12, (64, 1000), || 100), 25);
        assert_eq!(resolve(CacheSize::Auto, 10, (0, u64::MAX), || 5000), 500);
        assert_eq!(resolve(CacheSize::Percent(50), 10, (0, 1), || 5000), 2500);
        assert_eq!(resolve(CacheSize::Bytes(7), 10, (64, 1000), || 5000), 7);
    }

    #[test]
    fn the_machine_is_asked() {
        assert_eq!(
            parse_meminfo_total("MemTotal:       24684628 kB\nMemFree: 1 kB\n"),
            Some(24_684_628 * 1024)
        );
        let dir = tempfile::tempdir().unwrap();
        assert!(free_space(&dir.path().join("not/yet/made")).is_some_and(|b| b > 0));
        let mem = CacheSize::Auto.memory_bytes();
        assert!((AUTO_MEMORY_BOUNDS.0..=AUTO_MEMORY_BOUNDS.1).contains(&mem));
    }
}
