//! Who may connect and what they may do: SCRAM credentials per user and
//! mechanism, salted and hashed (never a password), and Kafka ACLs.
//! Brokers follow it by its own version, so a change reaches every broker
//! without re-reading the rest of the state.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use shoal_security::acl::{AclBinding, AclFilter};
use shoal_security::scram::{MAX_ITERATIONS, MIN_ITERATIONS, ScramCredential, ScramMechanism};

use crate::command::{Rejection, Reply};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Security {
    /// Bumped by every change of what is below.
    pub version: u64,
    pub users: BTreeMap<String, BTreeMap<ScramMechanism, ScramCredential>>,
    #[serde(default)]
    pub acls: BTreeSet<AclBinding>,
}

impl Security {
    pub(crate) fn put_credential(
        &mut self,
        user: String,
        mechanism: ScramMechanism,
        credential: ScramCredential,
    ) -> Reply {
        if user.is_empty() || user.len() > 256 {
            return invalid("a user name must have 1 to 256 bytes");
        }
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&credential.iterations) {
            return invalid("SCRAM iterations must be between 4096 and 16384");
        }
        if credential.salt.is_empty() || credential.stored_key.is_empty() {
            return invalid("a SCRAM credential needs a salt and keys");
        }
        self.users
            .entry(user)
            .or_default()
            .insert(mechanism, credential);
        self.version += 1;
        Reply::Done
    }

    pub(crate) fn delete_credential(&mut self, user: &str, mechanism: ScramMechanism) -> Reply {
        let Some(creds) = self.users.get_mut(user) else {
            return Reply::Rejected {
                rejection: Rejection::UnknownCredential { user: user.into() },
            };
        };
        if creds.remove(&mechanism).is_none() {
            return Reply::Rejected {
                rejection: Rejection::UnknownCredential { user: user.into() },
            };
        }
        if creds.is_empty() {
            self.users.remove(user);
        }
        self.version += 1;
        Reply::Done
    }
}

impl Security {
    /// All or nothing: one invalid binding refuses the lot.
    pub(crate) fn create_acls(&mut self, bindings: Vec<AclBinding>) -> Reply {
        if let Some(why) = bindings.iter().find_map(AclBinding::invalid) {
            return invalid(why);
        }
        self.acls.extend(bindings);
        self.version += 1;
        Reply::Done
    }

    /// Removes, per filter, the bindings it matches (a binding matched by
    /// two filters is reported under the first).
    pub(crate) fn delete_acls(&mut self, filters: &[AclFilter]) -> Reply {
        let mut deleted = Vec::with_capacity(filters.len());
        for f in filters {
            let gone: Vec<AclBinding> =
                self.acls.iter().filter(|b| f.matches(b)).cloned().collect();
            for b in &gone {
                self.acls.remove(b);
            }
            deleted.push(gone);
        }
        if deleted.iter().any(|d| !d.is_empty()) {
            self.version += 1;
        }
        Reply::AclsDeleted { deleted }
    }
}

fn invalid(reason: &str) -> Reply {
    Reply::Rejected {
        rejection: Rejection::Invalid {
            reason: reason.into(),
        },
    }
}
