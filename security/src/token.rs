//! Operators' bearer tokens: a file with one token per line, either the
//! token itself or `sha256:<hex>` of it. Blank lines and `#` comments are
//! skipped. A running server notices changes within a second, so `shoal
//! tokens create` and `revoke` take effect without a restart.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};

/// How often a server looks at the file's modification time.
const RECHECK: Duration = Duration::from_secs(1);
const PREFIX: &str = "sha256:";

pub struct TokenFile {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile")
            .field("path", &self.path)
            .finish()
    }
}

struct Loaded {
    digests: Vec<[u8; 32]>,
    stamp: Option<(SystemTime, u64)>,
    checked: Instant,
}

impl TokenFile {
    /// Reads the file now: a missing or malformed file is a start-up error.
    pub fn open(path: &Path) -> Result<Self> {
        let (digests, stamp) = read(path)?;
        Ok(TokenFile {
            path: path.to_path_buf(),
            loaded: Mutex::new(Loaded {
                digests,
                stamp,
                checked: Instant::now(),
            }),
        })
    }

    /// Is `token` one of the file's tokens? Compared by digest in constant
    /// time.
    pub fn accepts(&self, token: &str) -> bool {
        let digest = crate::sha256(token.as_bytes());
        let mut loaded = self.loaded.lock();
        if loaded.checked.elapsed() >= RECHECK {
            loaded.checked = Instant::now();
            if stamp(&self.path) != loaded.stamp {
                match read(&self.path) {
                    Ok((digests, stamp)) => {
                        loaded.digests = digests;
                        loaded.stamp = stamp;
                        tracing::info!(path = %self.path.display(), "token file reloaded");
                    }
                    // Keep the tokens last read rather than lock everyone out.
                    Err(e) => tracing::warn!("token file not reloaded: {e}"),
                }
            }
        }
        loaded
            .digests
            .iter()
            .fold(false, |found, d| found | bool::from(d.ct_eq(&digest)))
    }

    /// A new random token; its digest is appended to `path` (created with
    /// mode 0600 if missing). Returns the token, which is kept nowhere.
    pub fn create(path: &Path) -> Result<String> {
        let token = format!("shoal_{}", hex::encode(rand::random::<[u8; 24]>()));
        let line = format!("{PREFIX}{}\n", hex::encode(crate::sha256(token.as_bytes())));
        let write_err = |source| Error::Write {
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(write_err)?;
        f.write_all(line.as_bytes()).map_err(write_err)?;
        f.sync_all().map_err(write_err)?;
        Ok(token)
    }

    /// The id of each token in the file: the first 12 hex digits of its
    /// digest (a plaintext line is shown by its digest too).
    pub fn ids(path: &Path) -> Result<Vec<String>> {
        Ok(read(path)?.0.iter().map(id).collect())
    }

    /// Removes the tokens whose id starts with `id_prefix` (at least 6
    /// digits); returns how many went.
    pub fn revoke(path: &Path, id_prefix: &str) -> Result<usize> {
        if id_prefix.len() < 6 || !id_prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Invalid {
                what: format!("token id {id_prefix:?}"),
                why: "give at least 6 hex digits of an id from `shoal tokens list`",
            });
        }
        let text = read_text(path)?;
        let mut removed = 0;
        let mut kept = String::new();
        for line in text.lines() {
            let gone = parse_line(line)
                .ok()
                .flatten()
                .is_some_and(|d| id(&d).starts_with(&id_prefix.to_ascii_lowercase()));
            if gone {
                removed += 1;
            } else {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        if removed > 0 {
            let tmp = path.with_extension("tmp");
            let write_err = |source| Error::Write {
                path: path.to_path_buf(),
                source,
            };
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(write_err)?;
            f.write_all(kept.as_bytes()).map_err(write_err)?;
            f.sync_all().map_err(write_err)?;
            std::fs::rename(&tmp, path).map_err(write_err)?;
        }
        Ok(removed)
    }
}

fn id(digest: &[u8; 32]) -> String {
    hex::encode(&digest[..6])
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

type Digests = (Vec<[u8; 32]>, Option<(SystemTime, u64)>);

fn read(path: &Path) -> Result<Digests> {
    let stamp = stamp(path);
    let text = read_text(path)?;
    let mut digests = Vec::new();
    for (n, line) in text.lines().enumerate() {
        match parse_line(line) {
            Ok(Some(d)) => digests.push(d),
            Ok(None) => {}
            Err(why) => {
                return Err(Error::Invalid {
                    what: format!("{} line {}", path.display(), n + 1),
                    why,
                });
            }
        }
    }
    Ok((digests, stamp))
}

/// The digest a line stands for; `None` for blank lines and comments.
fn parse_line(line: &str) -> Result<Option<[u8; 32]>, &'static str> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    if let Some(h) = line.strip_prefix(PREFIX) {
        let mut d = [0u8; 32];
        hex::decode_to_slice(h, &mut d).map_err(|_| "expected sha256: and 64 hex digits")?;
        return Ok(Some(d));
    }
    if line.len() < 16 {
        return Err("a plaintext token must be at least 16 characters");
    }
    Ok(Some(crate::sha256(line.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_and_hashed_lines_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# operators\nplain-token-of-some-length\n\n").unwrap();
        let created = TokenFile::create(&path).unwrap();
        let file = TokenFile::open(&path).unwrap();
        assert!(file.accepts("plain-token-of-some-length"));
        assert!(file.accepts(&created));
        assert!(!file.accepts("plain-token-of-some-lengtH"));
        assert!(!file.accepts(""));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&created), "only the digest is stored");
        assert_eq!(TokenFile::ids(&path).unwrap().len(), 2);
    }

    #[test]
    fn revoked_tokens_stop_working_after_the_recheck() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let a = TokenFile::create(&path).unwrap();
        let b = TokenFile::create(&path).unwrap();
        let file = TokenFile::open(&path).unwrap();
        assert!(file.accepts(&a) && file.accepts(&b));
        let id_a = id(&crate::sha256(a.as_bytes()));
        assert_eq!(TokenFile::revoke(&path, &id_a).unwrap(), 1);
        file.loaded.lock().checked -= RECHECK;
        assert!(!file.accepts(&a));
        assert!(file.accepts(&b));
        assert!(TokenFile::revoke(&path, "ab").is_err());
    }

    #[test]
    fn malformed_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "sha256:nothex\n").unwrap();
        assert!(TokenFile::open(&path).is_err());
        std::fs::write(&path, "short\n").unwrap();
        assert!(TokenFile::open(&path).is_err());
    }
}
