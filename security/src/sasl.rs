//! The server side of Kafka's SASL mechanisms: PLAIN (RFC 4616) and
//! SCRAM-SHA-256/512 (RFC 5802, RFC 7677), sans-io: bytes in, bytes out,
//! and at the end the authenticated user name.
//!
//! SCRAM is written here on RustCrypto's primitives rather than taken from
//! rsasl: rsasl 2.3's server rebuilds the AuthMessage from parsed parts and
//! requires the final nonce to equal the client and server nonces, while
//! librdkafka (kcat, confluent-kafka) repeats the client nonce in its final
//! message. Kafka accepts any final nonce that ends with the server-first
//! nonce and signs the messages as sent; so does this server.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use subtle::ConstantTimeEq;

use crate::scram::{ScramCredential, ScramMechanism};

/// Where a SASL server looks users up.
pub trait CredentialStore: Send + Sync {
    fn scram(&self, user: &str, mechanism: ScramMechanism) -> Option<ScramCredential>;
    /// Checks a plaintext password (PLAIN) against whatever the user has.
    fn verify_password(&self, user: &str, password: &str) -> bool;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    Plain,
    Scram(ScramMechanism),
}

impl SaslMechanism {
    pub fn parse(s: &str) -> Option<Self> {
        if s.eq_ignore_ascii_case("PLAIN") {
            return Some(SaslMechanism::Plain);
        }
        ScramMechanism::parse(s).map(SaslMechanism::Scram)
    }

    pub fn name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::Scram(m) => m.name(),
        }
    }
}

/// How a step went.
#[derive(Debug)]
pub enum SaslStep {
    /// Send `challenge` and wait for the client's next message.
    Continue { challenge: Vec<u8> },
    /// Authenticated as `user`; `response` is the last server message
    /// (SCRAM's server-final, empty for PLAIN).
    Done { user: String, response: Vec<u8> },
    /// Refused. Unknown users and wrong passwords read the same; the
    /// reason never holds a secret.
    Failed { reason: &'static str },
}

const BAD_CREDENTIALS: &str = "authentication failed: invalid credentials";
const MALFORMED: &str = "authentication failed: malformed SASL message";

/// Starts exchanges against one credential store.
#[derive(Clone)]
pub struct SaslServer {
    store: Arc<dyn CredentialStore>,
}

impl std::fmt::Debug for SaslServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SaslServer")
    }
}

impl SaslServer {
    pub fn new(store: Arc<dyn CredentialStore>) -> Self {
        SaslServer { store }
    }

    pub fn start(&self, mechanism: SaslMechanism) -> SaslExchange {
        SaslExchange {
            store: self.store.clone(),
            state: match mechanism {
                SaslMechanism::Plain => State::Plain,
                SaslMechanism::Scram(m) => State::ScramFirst(m),
            },
        }
    }
}

/// One client's exchange in progress.
pub struct SaslExchange {
    store: Arc<dyn CredentialStore>,
    state: State,
}

enum State {
    Plain,
    ScramFirst(ScramMechanism),
    ScramFinal(Box<ScramPending>),
    Over,
}

struct ScramPending {
    mechanism: ScramMechanism,
    user: String,
    credential: ScramCredential,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    /// The client nonce followed by ours.
    nonce: String,
}

impl SaslExchange {
    pub fn step(&mut self, input: &[u8]) -> SaslStep {
        match std::mem::replace(&mut self.state, State::Over) {
            State::Plain => self.plain(input),
            State::ScramFirst(m) => self.scram_first(m, input, server_nonce()),
            State::ScramFinal(p) => scram_final(&p, input),
            State::Over => SaslStep::Failed {
                reason: "the SASL exchange is over",
            },
        }
    }

    /// `authzid NUL authcid NUL password`.
    fn plain(&self, input: &[u8]) -> SaslStep {
        let Ok(text) = std::str::from_utf8(input) else {
            return SaslStep::Failed { reason: MALFORMED };
        };
        let mut parts = text.split('\0');
        let (Some(authz), Some(user), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return SaslStep::Failed { reason: MALFORMED };
        };
        if user.is_empty() || (!authz.is_empty() && authz != user) {
            return SaslStep::Failed {
                reason: BAD_CREDENTIALS,
            };
        }
        if self.store.verify_password(user, password) {
            SaslStep::Done {
                user: user.to_string(),
                response: Vec::new(),
            }
        } else {
            SaslStep::Failed {
                reason: BAD_CREDENTIALS,
            }
        }
    }

    /// `gs2-header client-first-message-bare` -> server-first-message.
    fn scram_first(&mut self, m: ScramMechanism, input: &[u8], snonce: String) -> SaslStep {
        let Some(first) = parse_client_first(input) else {
            return SaslStep::Failed { reason: MALFORMED };
        };
        if first.authzid.is_some_and(|a| a != first.user) {
            return SaslStep::Failed {
                reason: BAD_CREDENTIALS,
            };
        }
        // An unknown user gets a challenge too, with a salt that stays the
        // same across attempts, and fails at the proof like a wrong
        // password: the exchange does not tell which users exist.
        let credential = self
            .store
            .scram(&first.user, m)
            .unwrap_or_else(|| decoy_credential(m, &first.user));
        let nonce = format!("{}{snonce}", first.nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&credential.salt),
            credential.iterations
        );
        let challenge = server_first.clone().into_bytes();
        self.state = State::ScramFinal(Box::new(ScramPending {
            mechanism: m,
            user: first.user,
            credential,
            gs2_header: first.gs2_header.to_string(),
            client_first_bare: first.bare.to_string(),
            server_first,
            nonce,
        }));
        SaslStep::Continue { challenge }
    }
}

/// A credential no password matches, for a user the store does not know:
/// its salt is derived from the name with a key of this process, so it is
/// stable from one attempt to the next, as a real user's is.
fn decoy_credential(m: ScramMechanism, user: &str) -> ScramCredential {
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(rand::random);
    let mut salt = m.hmac(key, &[user.as_bytes()]);
    salt.truncate(24);
    ScramCredential {
        salt,
        iterations: crate::scram::MIN_ITERATIONS,
        stored_key: rand::random::<[u8; 32]>().to_vec(),
        server_key: rand::random::<[u8; 32]>().to_vec(),
    }
}

/// `c=..,r=..[,ext],p=..` -> server-final-message.
fn scram_final(p: &ScramPending, input: &[u8]) -> SaslStep {
    let Some(text) = std::str::from_utf8(input).ok() else {
        return SaslStep::Failed { reason: MALFORMED };
    };
    let Some((without_proof, proof)) = text.rsplit_once(",p=") else {
        return SaslStep::Failed { reason: MALFORMED };
    };
    let mut attrs = without_proof.split(',');
    let binding = attrs.next().and_then(|a| a.strip_prefix("c="));
    let nonce = attrs.next().and_then(|a| a.strip_prefix("r="));
    let (Some(binding), Some(nonce)) = (binding, nonce) else {
        return SaslStep::Failed { reason: MALFORMED };
    };
    // No channel binding: `c=` is the GS2 header the client sent.
    if B64.decode(binding).ok().as_deref() != Some(p.gs2_header.as_bytes())
        || !nonce.ends_with(&p.nonce)
    {
        return SaslStep::Failed {
            reason: BAD_CREDENTIALS,
        };
    }
    let Ok(proof) = B64.decode(proof) else {
        return SaslStep::Failed { reason: MALFORMED };
    };
    let auth_message = format!("{},{},{without_proof}", p.client_first_bare, p.server_first);
    let m = p.mechanism;
    let signature = m.hmac(&p.credential.stored_key, &[auth_message.as_bytes()]);
    if proof.len() != signature.len() {
        return SaslStep::Failed {
            reason: BAD_CREDENTIALS,
        };
    }
    let client_key: Vec<u8> = proof.iter().zip(&signature).map(|(a, b)| a ^ b).collect();
    if !bool::from(m.hash(&client_key).ct_eq(&p.credential.stored_key)) {
        return SaslStep::Failed {
            reason: BAD_CREDENTIALS,
        };
    }
    let verifier = m.hmac(&p.credential.server_key, &[auth_message.as_bytes()]);
    SaslStep::Done {
        user: p.user.clone(),
        response: format!("v={}", B64.encode(verifier)).into_bytes(),
    }
}

struct ClientFirst<'a> {
    gs2_header: &'a str,
    authzid: Option<String>,
    bare: &'a str,
    user: String,
    nonce: &'a str,
}

fn parse_client_first(input: &[u8]) -> Option<ClientFirst<'_>> {
    let text = std::str::from_utf8(input).ok()?;
    // gs2-header = cbind-flag "," [ authzid ] ","; `p=` (channel binding
    // required) is not offered, so refused.
    let (flag, rest) = text.split_once(',')?;
    if flag != "n" && flag != "y" {
        return None;
    }
    let (authz, bare) = rest.split_once(',')?;
    let gs2_header = &text[..flag.len() + authz.len() + 2];
    let authzid = match authz {
        "" => None,
        a => Some(sasl_name(a.strip_prefix("a=")?)?),
    };
    let mut attrs = bare.split(',');
    let user = sasl_name(attrs.next()?.strip_prefix("n=")?)?;
    let nonce = attrs.next()?.strip_prefix("r=")?;
    if user.is_empty() || nonce.is_empty() || !nonce.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return None;
    }
    Some(ClientFirst {
        gs2_header,
        authzid,
        bare,
        user,
        nonce,
    })
}

/// RFC 5802 saslname: `=2C` is `,` and `=3D` is `=`; any other `=` is an
/// error.
fn sasl_name(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 3)?;
        out.push(match code {
            "2C" => ',',
            "3D" => '=',
            _ => return None,
        });
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// 32 random letters and digits (as Kafka's, nothing a client could
/// misparse).
fn server_nonce() -> String {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..32)
        .map(|_| char::from(CHARS[rand::random_range(0..CHARS.len())]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Users(BTreeMap<(String, ScramMechanism), ScramCredential>);

    impl CredentialStore for Users {
        fn scram(&self, user: &str, m: ScramMechanism) -> Option<ScramCredential> {
            self.0.get(&(user.to_string(), m)).cloned()
        }
        fn verify_password(&self, user: &str, password: &str) -> bool {
            self.0
                .iter()
                .any(|((u, m), c)| u == user && c.verify(*m, password))
        }
    }

    fn rfc7677_user() -> Arc<Users> {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let mut creds = BTreeMap::new();
        let c = ScramCredential::new(ScramMechanism::Sha256, "pencil", 4096);
        // The same password under the RFC's salt, so its proof applies.
        let rfc = ScramCredential { salt, ..c.clone() };
        let salted = {
            let mut out = [0u8; 32];
            pbkdf2::pbkdf2_hmac::<sha2::Sha256>(b"pencil", &rfc.salt, 4096, &mut out);
            out
        };
        let rfc =
            ScramCredential::from_salted_password(ScramMechanism::Sha256, &salted, rfc.salt, 4096);
        creds.insert(("user".to_string(), ScramMechanism::Sha256), rfc);
        creds.insert(
            ("alice".to_string(), ScramMechanism::Sha512),
            ScramCredential::new(ScramMechanism::Sha512, "wonder", 4096),
        );
        Arc::new(Users(creds))
    }

    /// RFC 7677 §3's exchange, byte for byte.
    #[test]
    fn rfc7677_exchange() {
        let server = SaslServer::new(rfc7677_user());
        let mut x = server.start(SaslMechanism::Scram(ScramMechanism::Sha256));
        let State::ScramFirst(m) = x.state else {
            panic!()
        };
        let SaslStep::Continue { challenge } = x.scram_first(
            m,
            b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into(),
        ) else {
            panic!("no server-first")
        };
        assert_eq!(
            String::from_utf8(challenge).unwrap(),
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let final_msg = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        match x.step(final_msg) {
            SaslStep::Done { user, response } => {
                assert_eq!(user, "user");
                assert_eq!(
                    String::from_utf8(response).unwrap(),
                    "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
                );
            }
            other => panic!("{other:?}"),
        }
        // The same exchange with a flipped proof bit fails.
        let mut x = server.start(SaslMechanism::Scram(ScramMechanism::Sha256));
        let _ = x.scram_first(
            m,
            b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into(),
        );
        let bad = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=eHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        assert!(matches!(x.step(bad), SaslStep::Failed { .. }));
    }

    #[test]
    fn unknown_users_and_malformed_messages_fail() {
        let server = SaslServer::new(rfc7677_user());
        let scram = SaslMechanism::Scram(ScramMechanism::Sha512);
        for msg in [
            &b"p=tls-unique,,n=alice,r=abc"[..],
            b"n,,r=abc",
            b"n,,n=al=ice,r=abc",
            b"\xff",
            b"",
            b"n,a=bob,n=alice,r=abc",
        ] {
            assert!(
                matches!(server.start(scram).step(msg), SaslStep::Failed { .. }),
                "{msg:?}"
            );
        }
        let mut x = server.start(scram);
        assert!(matches!(
            x.step(b"n,,n=alice,r=abc"),
            SaslStep::Continue { .. }
        ));
        assert!(matches!(
            x.step(b"c=biws,r=nope,p=AAAA"),
            SaslStep::Failed { .. }
        ));
        assert!(matches!(x.step(b"anything"), SaslStep::Failed { .. }));
    }

    #[test]
    fn an_unknown_user_reads_like_a_wrong_password() {
        let server = SaslServer::new(rfc7677_user());
        let scram = SaslMechanism::Scram(ScramMechanism::Sha256);
        let salt_of = |user: &str| {
            let mut x = server.start(scram);
            let SaslStep::Continue { challenge } = x.step(format!("n,,n={user},r=abc").as_bytes())
            else {
                panic!("no challenge for {user}");
            };
            let text = String::from_utf8(challenge).unwrap();
            let salt = text
                .split(',')
                .find_map(|a| a.strip_prefix("s="))
                .unwrap()
                .to_string();
            (x, salt)
        };
        let (mut x, salt) = salt_of("bob");
        // The same salt on the next attempt, as a real user's.
        assert_eq!(salt_of("bob").1, salt);
        assert_ne!(salt_of("carol").1, salt);
        let last = x.step(b"c=biws,r=abc,p=AAAA");
        assert!(matches!(last, SaslStep::Failed { reason } if reason == BAD_CREDENTIALS));
    }

    #[test]
    fn plain_checks_the_scram_credential() {
        let s = SaslServer::new(rfc7677_user());
        let ok = s.start(SaslMechanism::Plain).step(b"\0alice\0wonder");
        assert!(matches!(ok, SaslStep::Done { user, .. } if user == "alice"));
        for bad in [
            &b"\0alice\0nope"[..],
            b"bob\0alice\0wonder",
            b"\xff\xfe",
            b"alice",
            b"\0alice\0wonder\0x",
        ] {
            assert!(matches!(
                s.start(SaslMechanism::Plain).step(bad),
                SaslStep::Failed { .. }
            ));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, ..Default::default() })]

        /// Arbitrary client messages, first and final, never panic.
        #[test]
        fn arbitrary_messages_never_panic(
            first in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            last in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
        ) {
            let server = SaslServer::new(rfc7677_user());
            for m in [SaslMechanism::Plain, SaslMechanism::Scram(ScramMechanism::Sha512)] {
                let mut x = server.start(m);
                let _ = x.step(&first);
                let _ = x.step(&last);
            }
            let mut x = server.start(SaslMechanism::Scram(ScramMechanism::Sha512));
            if matches!(x.step(b"n,,n=alice,r=abc"), SaslStep::Continue { .. }) {
                let _ = x.step(&last);
            }
        }
    }

    #[test]
    fn sasl_names_unescape() {
        assert_eq!(sasl_name("a=2Cb=3Dc").as_deref(), Some("a,b=c"));
        assert_eq!(sasl_name("a=4"), None);
    }
}
