//! The SASL server: the input as a PLAIN message, then split at its first
//! newline into SCRAM's client-first and client-final messages.
#![no_main]

use std::sync::Arc;

use shoal_security::sasl::{CredentialStore, SaslMechanism, SaslServer};
use shoal_security::scram::{ScramCredential, ScramMechanism};

struct OneUser(ScramCredential);

impl CredentialStore for OneUser {
    fn scram(&self, user: &str, _: ScramMechanism) -> Option<ScramCredential> {
        (user == "alice").then(|| self.0.clone())
    }
    fn verify_password(&self, user: &str, password: &str) -> bool {
        user == "alice" && self.0.verify(ScramMechanism::Sha256, password)
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    static STORE: std::sync::OnceLock<Arc<OneUser>> = std::sync::OnceLock::new();
    let store = STORE.get_or_init(|| {
        Arc::new(OneUser(ScramCredential::new(ScramMechanism::Sha256, "pw", 4096)))
    });
    let server = SaslServer::new(store.clone());
    let _ = server.start(SaslMechanism::Plain).step(data);
    let (first, last) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let mut x = server.start(SaslMechanism::Scram(ScramMechanism::Sha256));
    let _ = x.step(first);
    let _ = x.step(last);
});
