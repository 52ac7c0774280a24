//! This broker's copy of placement's users: what SASL (and MQTT password
//! checks) authenticate against. Followed by version, so a user added or
//! removed anywhere reaches every broker within a poll.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use parking_lot::RwLock;
use shoal_placement::Security;
use shoal_security::sasl::{CredentialStore, SaslServer};
use shoal_security::scram::{ScramCredential, ScramMechanism};

use crate::broker::Broker;

/// The iteration count of `shoal users add` and Kafka's clients by default.
const DECOY_ITERATIONS: u32 = shoal_security::scram::MIN_ITERATIONS;

/// How often placement is asked whether the users changed.
const POLL: Duration = Duration::from_millis(500);

#[derive(Default)]
pub struct Users {
    current: RwLock<Arc<Security>>,
    /// Set once the first copy arrived: before it, nobody authenticates.
    loaded: std::sync::atomic::AtomicBool,
    /// Placement was found unreachable before the first copy (said once).
    warned: std::sync::atomic::AtomicBool,
}

impl Users {
    pub(crate) fn replace(&self, s: Security) {
        *self.current.write() = Arc::new(s);
        self.loaded
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn version(&self) -> Option<u64> {
        self.loaded
            .load(std::sync::atomic::Ordering::Acquire)
            .then(|| self.current.read().version)
    }

    /// Has the first copy arrived? Before it, ACLs deny everything (an
    /// empty set would otherwise let `allow.everyone.if.no.acl.found`
    /// open every resource).
    pub(crate) fn is_loaded(&self) -> bool {
        self.loaded.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn snapshot(&self) -> Arc<Security> {
        self.current.read().clone()
    }

    pub(crate) fn knows(&self, user: &str) -> bool {
        self.current.read().users.contains_key(user)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.current.read().users.is_empty()
    }
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("count", &self.current.read().users.len())
            .finish()
    }
}

impl CredentialStore for Users {
    fn scram(&self, user: &str, mechanism: ScramMechanism) -> Option<ScramCredential> {
        self.current
            .read()
            .users
            .get(user)?
            .get(&mechanism)
            .cloned()
    }

    /// The strongest mechanism the user has decides. An unknown user costs
    /// the same hashing as a known one, so timing does not tell them apart.
    fn verify_password(&self, user: &str, password: &str) -> bool {
        let current = self.current.read().clone();
        let Some(creds) = current.users.get(user) else {
            let decoy = ScramCredential {
                salt: vec![0; 24],
                iterations: DECOY_ITERATIONS,
                stored_key: vec![0; 64],
                server_key: Vec::new(),
            };
            let _ = decoy.verify(ScramMechanism::Sha512, password);
            return false;
        };
        creds
            .iter()
            .next_back()
            .is_some_and(|(m, c)| c.verify(*m, password))
    }
}

/// Runs a password check. Argon2 and PBKDF2 are meant to take
/// milliseconds: on a multi-thread runtime the worker hands its other tasks
/// on while it hashes.
pub(crate) fn hashing<R>(check: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(check)
        }
        _ => check(),
    }
}

/// The SASL server of a broker, over its users.
pub(crate) fn sasl_server(users: Arc<Users>) -> SaslServer {
    SaslServer::new(users)
}

/// Refresh the users whenever placement's copy changes.
pub async fn follow(broker: Arc<Broker>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        refresh(&broker).await;
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

pub(crate) async fn refresh(broker: &Broker) {
    let known = broker.users.version();
    match broker
        .placement
        .query(shoal_placement::Query::Security { known })
        .await
    {
        Ok(shoal_placement::QueryReply::Security { security: Some(s) }) => broker.users.replace(s),
        Ok(_) => {}
        Err(e) if broker.users.is_loaded() || broker.users.warned.swap(true, Relaxed) => {
            tracing::debug!("users not refreshed: {e}")
        }
        Err(e) => tracing::warn!(
            "users and ACLs not loaded yet (authentication and ACL checks refuse until they \
             are): {e}"
        ),
    }
}
