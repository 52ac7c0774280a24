//! A credential held in memory: read from a file or an environment
//! variable, never printed.

use std::path::Path;

use crate::error::{Error, Result};

/// Shorter secrets are refused: the cluster secret is all that stands
/// between the network and placement's write API.
const MIN_LEN: usize = 16;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// The file's content without surrounding whitespace.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::new(text.trim(), &path.display().to_string())
    }

    /// `what` names the source in errors (a path or a variable name).
    pub fn new(value: &str, what: &str) -> Result<Self> {
        if value.len() < MIN_LEN {
            return Err(Error::Invalid {
                what: what.to_string(),
                why: "a secret must be at least 16 characters",
            });
        }
        if value.chars().any(|c| c.is_control() || c == ' ') {
            return Err(Error::Invalid {
                what: what.to_string(),
                why: "a secret must not contain spaces or control characters",
            });
        }
        Ok(Secret(value.to_string()))
    }

    /// From `--...-file` when given, else from the variable `env` when set.
    pub fn from_file_or_env(file: Option<&Path>, env: &str) -> Result<Option<Self>> {
        if let Some(path) = file {
            return Self::from_file(path).map(Some);
        }
        match std::env::var(env) {
            Ok(v) if !v.trim().is_empty() => Self::new(v.trim(), env).map(Some),
            _ => Ok(None),
        }
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub(crate) fn digest(&self) -> [u8; 32] {
        crate::sha256(self.0.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_value() {
        let s = Secret::new("a-long-enough-cluster-secret", "test").unwrap();
        assert!(!format!("{s:?}").contains("cluster"));
        assert!(Secret::new("short", "test").is_err());
        assert!(Secret::new("has a space in it, sadly", "test").is_err());
    }
}
