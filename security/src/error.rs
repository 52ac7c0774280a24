//! The one error type of the security crate. Messages name files and
//! settings, never the secret they hold.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A secret or token file's content is unusable; `what` says where.
    #[error("{what}: {why}")]
    Invalid { what: String, why: &'static str },
    #[error("{0} is not set")]
    MissingEnv(&'static str),
    #[error("no region for secret {id}: neither its ARN nor AWS_REGION names one")]
    NoRegion { id: String },
    #[error("invalid Secrets Manager endpoint {endpoint:?}")]
    BadEndpoint { endpoint: String },
    #[error("GetSecretValue {id}: {source}")]
    SecretRequest { id: String, source: reqwest::Error },
    #[error("GetSecretValue {id}: HTTP {status} {kind}")]
    SecretRefused {
        id: String,
        status: u16,
        /// AWS's error type (`ResourceNotFoundException`, ...).
        kind: String,
    },
    #[error("secret {id} has no SecretString (binary secrets are not supported)")]
    NotAString { id: String },
}
