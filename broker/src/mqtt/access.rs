//! Who may connect and what they may publish and subscribe to: a password
//! file of argon2 hashes and an ACL file, both read at start.
//!
//! Password file: one `user:$argon2id$...` line per user (written by
//! `shoal mqtt passwd`). ACL file, in the spirit of Mosquitto's:
//!
//! ```text
//! # rules before any `user` line apply to anonymous clients
//! topic read public/#
//! user alice
//! topic readwrite alice/#
//! # for every client; %u = user name, %c = client id
//! pattern write devices/%c/out
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordVerifier};

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Syntax {
        path: String,
        line: usize,
        reason: String,
    },
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    BadCredentials,
    NotAuthorized,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rights {
    read: bool,
    write: bool,
}

#[derive(Debug, Clone)]
struct Rule {
    rights: Rights,
    filter: String,
}

#[derive(Debug, Default)]
struct Acl {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

/// The access policy of the MQTT listener.
#[derive(Debug)]
pub struct Access {
    /// user -> PHC hash string; `None`: no password file.
    passwords: Option<HashMap<String, String>>,
    allow_anonymous: bool,
    acl: Option<Acl>,
    /// The broker's SCRAM users (`shoal users add`): a user the password
    /// file does not list is checked against them.
    users: Option<Arc<crate::security::Users>>,
}

impl Access {
    /// Everyone may connect and do anything (no files given).
    pub fn open() -> Self {
        Access {
            passwords: None,
            allow_anonymous: true,
            users: None,
            acl: None,
        }
    }

    pub fn load(
        password_file: Option<&Path>,
        acl_file: Option<&Path>,
        allow_anonymous: bool,
    ) -> Result<Self, AccessError> {
        let passwords = password_file.map(read_passwords).transpose()?;
        let acl = acl_file.map(read_acl).transpose()?;
        Ok(Access {
            passwords,
            allow_anonymous,
            acl,
            users: None,
        })
    }

    pub(crate) fn authenticate(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<(), Refusal> {
        let Some(user) = username else {
            return if self.allow_anonymous {
                Ok(())
            } else {
                Err(Refusal::NotAuthorized)
            };
        };
        let in_file = self.passwords.as_ref().and_then(|p| p.get(user));
        let scram = self.users.as_ref().filter(|u| u.knows(user));
        let hash = match (in_file, scram) {
            (Some(hash), _) => hash,
            (None, Some(users)) => {
                let Some(password) = password.and_then(|p| std::str::from_utf8(p).ok()) else {
                    return Err(Refusal::BadCredentials);
                };
                let verify = || {
                    if shoal_security::sasl::CredentialStore::verify_password(
                        users.as_ref(),
                        user,
                        password,
                    ) {
                        Ok(())
                    } else {
                        Err(Refusal::BadCredentials)
                    }
                };
                return crate::security::hashing(verify);
            }
            // Neither source lists the user. Only where anonymous clients
            // are welcome and no credential exists at all are names taken
            // as given (they still select ACL rules), as Mosquitto does
            // without a password file.
            (None, None) => {
                let unchecked = self.allow_anonymous
                    && self.passwords.is_none()
                    && self.users.as_ref().is_none_or(|u| u.is_empty());
                return if unchecked {
                    Ok(())
                } else {
                    Err(Refusal::BadCredentials)
                };
            }
        };
        let Some(password) = password else {
            return Err(Refusal::BadCredentials);
        };
        let Ok(parsed) = PasswordHash::new(hash) else {
            return Err(Refusal::BadCredentials);
        };
        let verify = || {
            argon2::Argon2::default()
                .verify_password(password, &parsed)
                .map_err(|_| Refusal::BadCredentials)
        };
        crate::security::hashing(verify)
    }

    /// Check passwords against the broker's SCRAM users too.
    pub(crate) fn with_users(mut self, users: Arc<crate::security::Users>) -> Self {
        self.users = Some(users);
        self
    }

    pub(crate) fn may_publish(&self, user: Option<&str>, client: &str, topic: &str) -> bool {
        self.allowed(user, client, |r, filter| {
            r.write && super::topic::matches(topic, filter)
        })
    }

    pub(crate) fn may_subscribe(&self, user: Option<&str>, client: &str, filter: &str) -> bool {
        let inner = super::hub::shared(filter).map_or(filter, |(_, f)| f);
        self.allowed(user, client, |r, acl| r.read && covers(acl, inner))
    }

    fn allowed(
        &self,
        user: Option<&str>,
        client: &str,
        check: impl Fn(Rights, &str) -> bool,
    ) -> bool {
        let Some(acl) = &self.acl else {
            return true;
        };
        let own = match user {
            None => acl.anonymous.as_slice(),
            Some(u) => acl.users.get(u).map_or(&[][..], Vec::as_slice),
        };
        if own.iter().any(|r| check(r.rights, &r.filter)) {
            return true;
        }
        acl.patterns
            .iter()
            .any(|r| substitute(&r.filter, user, client).is_some_and(|f| check(r.rights, &f)))
    }
}

/// `%u` and `%c` replaced; `None` if a value would change the filter's
/// shape (a wildcard or level separator in a user name or client id).
fn substitute(filter: &str, user: Option<&str>, client: &str) -> Option<String> {
    let unsafe_value = |v: &str| v.contains(['/', '+', '#']);
    let mut out = filter.to_string();
    if out.contains("%u") {
        let u = user?;
        if unsafe_value(u) {
            return None;
        }
        out = out.replace("%u", u);
    }
    if out.contains("%c") {
        if unsafe_value(client) {
            return None;
        }
        out = out.replace("%c", client);
    }
    Some(out)
}

/// Does ACL filter `acl` allow subscribing to `sub` (every topic `sub`
/// matches is matched by `acl`)?
fn covers(acl: &str, sub: &str) -> bool {
    let mut a = acl.split('/');
    let mut s = sub.split('/');
    loop {
        match (a.next(), s.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(l)) if l != "#" => {}
            (Some(al), Some(sl)) if al == sl && sl != "+" && sl != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn read_text(path: &Path) -> Result<String, AccessError> {
    std::fs::read_to_string(path).map_err(|source| AccessError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn read_passwords(path: &Path) -> Result<HashMap<String, String>, AccessError> {
    let mut users = HashMap::new();
    for (i, line) in read_text(path)?.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, hash)) = line.split_once(':') else {
            return Err(AccessError::Syntax {
                path: path.display().to_string(),
                line: i + 1,
                reason: "expected user:hash".into(),
            });
        };
        if PasswordHash::new(hash).is_err() {
            return Err(AccessError::Syntax {
                path: path.display().to_string(),
                line: i + 1,
                reason: format!("the hash of {user:?} is not a PHC string"),
            });
        }
        users.insert(user.to_string(), hash.to_string());
    }
    Ok(users)
}

fn read_acl(path: &Path) -> Result<Acl, AccessError> {
    let mut acl = Acl::default();
    let mut current: Option<String> = None;
    for (i, line) in read_text(path)?.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |reason: &str| AccessError::Syntax {
            path: path.display().to_string(),
            line: i + 1,
            reason: reason.into(),
        };
        let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim();
        match word {
            "user" if !rest.is_empty() => current = Some(rest.to_string()),
            "topic" | "pattern" => {
                let (rights, filter) = match rest.split_once(char::is_whitespace) {
                    Some(("read", f)) => (
                        Rights {
                            read: true,
                            write: false,
                        },
                        f,
                    ),
                    Some(("write", f)) => (
                        Rights {
                            read: false,
                            write: true,
                        },
                        f,
                    ),
                    Some(("readwrite", f)) => (
                        Rights {
                            read: true,
                            write: true,
                        },
                        f,
                    ),
                    _ => (
                        Rights {
                            read: true,
                            write: true,
                        },
                        rest,
                    ),
                };
                let filter = filter.trim();
                if !super::topic::valid_filter(filter) {
                    return Err(err("invalid topic filter"));
                }
                let rule = Rule {
                    rights,
                    filter: filter.to_string(),
                };
                match (word, &current) {
                    ("pattern", _) => acl.patterns.push(rule),
                    (_, None) => acl.anonymous.push(rule),
                    (_, Some(u)) => acl.users.entry(u.clone()).or_default().push(rule),
                }
            }
            _ => {
                return Err(err(
                    "expected `user NAME`, `topic [read|write|readwrite] FILTER` or `pattern ...`",
                ));
            }
        }
    }
    Ok(acl)
}

/// A password file line for `user` (what `shoal mqtt passwd` writes).
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing the password: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_coverage() {
        assert!(covers("a/#", "a/b/+"));
        assert!(covers("a/+", "a/b"));
        assert!(covers("a/+", "a/+"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(covers("#", "#"));
    }

    #[test]
    fn substitution_refuses_wildcards_in_names() {
        assert_eq!(substitute("d/%c/x", None, "c1").as_deref(), Some("d/c1/x"));
        assert_eq!(substitute("d/%u/x", None, "c1"), None);
        assert_eq!(substitute("d/%c/x", None, "a/#"), None);
    }

    #[test]
    fn passwords_and_rules() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        let hash = hash_password(b"secret").unwrap();
        std::fs::write(&pw, format!("alice:{hash}\n")).unwrap();
        let acl = dir.path().join("acl");
        std::fs::write(
            &acl,
            "topic read public/#\nuser alice\ntopic readwrite alice/#\npattern write dev/%c/out\n",
        )
        .unwrap();
        let a = Access::load(Some(&pw), Some(&acl), false).unwrap();
        assert_eq!(a.authenticate(Some("alice"), Some(b"secret")), Ok(()));
        assert_eq!(
            a.authenticate(Some("alice"), Some(b"nope")),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(a.authenticate(None, None), Err(Refusal::NotAuthorized));
        assert!(a.may_publish(Some("alice"), "c", "alice/x"));
        assert!(!a.may_publish(Some("alice"), "c", "bob/x"));
        assert!(a.may_publish(Some("alice"), "c9", "dev/c9/out"));
        assert!(!a.may_publish(Some("alice"), "c9", "dev/c8/out"));
        assert!(a.may_subscribe(None, "c", "public/+"));
        assert!(!a.may_subscribe(None, "c", "#"));
    }
}
