//! Shoal's security primitives, shared by every role.
//!
//! Owns the secrets a node is configured with and how they are checked:
//! the cluster secret nodes present to each other, operators' bearer tokens
//! (a file of plaintext or `sha256:` lines), the HTTP middleware that
//! requires one of them, and the HTTP client settings that present one.
//! It does not own where credentials are stored (placement) or any
//! protocol's handshake (the broker).
//!
//! - [`Secret`]: a credential read from a file or the environment; its
//!   `Debug` never shows it.
//! - [`TokenFile`]: operators' tokens, re-read when the file changes.
//! - [`HttpAuth`]: what an HTTP server accepts; [`HttpAuth::protect`] wraps
//!   a router so everything but `/health` and `/metrics` needs a token.
//! - [`ClientAuth`]: what an HTTP client presents (cluster secret or token).
//! - `aws_secret` (feature `aws`): a secret read from AWS Secrets Manager.

pub mod acl;
#[cfg(feature = "aws")]
pub mod aws_secret;
mod error;
mod http;
pub mod limits;
pub mod sasl;
pub mod scram;
mod secret;
pub mod tls;
mod token;

pub use error::{Error, Result};
pub use http::{Caller, ClientAuth, HttpAuth, nodes_only, operator_refused};
pub use secret::Secret;
pub use token::TokenFile;

/// SHA-256 of `bytes`: how tokens and the cluster secret are compared.
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}
