//! MQTT routes between the brokers of a cluster: which filters this
//! broker has subscribers for (sent with its heartbeat), and which filters
//! the other live brokers have (from placement's reply), so a publish is
//! forwarded to exactly the brokers with matching subscribers.
//!
//! A standalone broker has no peers: its remote routes stay empty.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::{Mutex, RwLock};
use shoal_placement::{BrokerId, MqttRoute};

use super::hub::{GroupKey, shared};
use super::trie::Trie;

/// Who a publish must reach on other brokers.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct RemoteMatch {
    /// Brokers with a matching ordinary subscription.
    pub plain: Vec<BrokerId>,
    /// Shared groups (group, filter) with members on other brokers, and
    /// those brokers.
    pub groups: Vec<(GroupKey, Vec<BrokerId>)>,
}

#[derive(Default)]
struct Remote {
    /// Key: (broker, shared group if any).
    trie: Trie<(BrokerId, Option<Arc<str>>), ()>,
    addrs: HashMap<BrokerId, String>,
    routes: Vec<MqttRoute>,
}

/// This broker's MQTT routes and its peers'.
#[derive(Default)]
pub struct Routes {
    /// Filters with subscribers here, with how many sessions hold each;
    /// `None` until an MQTT listener runs here.
    local: Mutex<Option<BTreeMap<String, usize>>>,
    remote: RwLock<Remote>,
    /// Round robin over the brokers of a shared group.
    turn: AtomicUsize,
    clustered: std::sync::atomic::AtomicBool,
}

impl Routes {
    /// This broker serves MQTT: it reports routes (possibly none).
    pub(crate) fn serve(&self) {
        self.local.lock().get_or_insert_with(BTreeMap::new);
    }

    /// A session subscribed to `filter` (as written, `$share/...` too).
    pub(crate) fn add_local(&self, filter: &str) {
        if let Some(l) = self.local.lock().as_mut() {
            *l.entry(filter.to_string()).or_default() += 1;
        }
    }

    pub(crate) fn remove_local(&self, filter: &str) {
        if let Some(l) = self.local.lock().as_mut()
            && let Some(n) = l.get_mut(filter)
        {
            *n -= 1;
            if *n == 0 {
                l.remove(filter);
            }
        }
    }

    /// What the heartbeat reports.
    pub fn local_filters(&self) -> Option<Vec<String>> {
        self.local
            .lock()
            .as_ref()
            .map(|l| l.keys().cloned().collect())
    }

    /// The other brokers' routes, from a heartbeat reply.
    pub fn set_remote(&self, routes: &[MqttRoute], me: BrokerId) {
        self.clustered.store(true, Ordering::Relaxed);
        let routes: Vec<MqttRoute> = routes.iter().filter(|r| r.broker != me).cloned().collect();
        if self.remote.read().routes == routes {
            return;
        }
        let mut remote = Remote::default();
        for r in &routes {
            remote.addrs.insert(r.broker, r.http_addr.clone());
            for f in &r.filters {
                match shared(f) {
                    Some((group, inner)) => {
                        remote
                            .trie
                            .insert(inner, (r.broker, Some(Arc::from(group))), ());
                    }
                    None => {
                        remote.trie.insert(f, (r.broker, None), ());
                    }
                }
            }
        }
        remote.routes = routes;
        *self.remote.write() = remote;
    }

    pub(crate) fn has_peers(&self) -> bool {
        !self.remote.read().routes.is_empty()
    }

    /// Part of a cluster (told the routes at least once), with or without
    /// other MQTT brokers.
    pub(crate) fn clustered(&self) -> bool {
        self.clustered.load(Ordering::Relaxed)
    }

    /// The other brokers serving MQTT.
    pub(crate) fn peers(&self) -> Vec<BrokerId> {
        self.remote.read().routes.iter().map(|r| r.broker).collect()
    }

    pub(crate) fn addr(&self, broker: BrokerId) -> Option<String> {
        self.remote.read().addrs.get(&broker).cloned()
    }

    /// The other brokers a message on `topic` must reach.
    pub(crate) fn matches(&self, topic: &str) -> RemoteMatch {
        let remote = self.remote.read();
        let mut plain = Vec::new();
        let mut groups: BTreeMap<GroupKey, Vec<BrokerId>> = BTreeMap::new();
        remote
            .trie
            .matches(topic, |filter, (broker, group), _| match group {
                None => plain.push(*broker),
                Some(g) => groups
                    .entry((g.clone(), filter.to_string()))
                    .or_default()
                    .push(*broker),
            });
        plain.sort_unstable();
        plain.dedup();
        RemoteMatch {
            plain,
            groups: groups
                .into_iter()
                .map(|(k, mut v)| {
                    v.sort_unstable();
                    v.dedup();
                    (k, v)
                })
                .collect(),
        }
    }

    /// Which of `n` candidates takes the next shared message.
    pub(crate) fn next_turn(&self, n: usize) -> usize {
        self.turn.fetch_add(1, Ordering::Relaxed) % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_routes_match_plain_and_shared_filters() {
        let r = Routes::default();
        r.set_remote(
            &[
                MqttRoute {
                    broker: 1,
                    http_addr: "me".into(),
                    filters: vec!["#".into()],
                },
                MqttRoute {
                    broker: 2,
                    http_addr: "b2".into(),
                    filters: vec!["a/+".into(), "$share/g/a/#".into()],
                },
                MqttRoute {
                    broker: 3,
                    http_addr: "b3".into(),
                    filters: vec!["$share/g/a/#".into(), "b".into()],
                },
            ],
            1,
        );
        let m = r.matches("a/x");
        assert_eq!(m.plain, vec![2]);
        assert_eq!(
            m.groups,
            vec![((Arc::from("g"), "a/#".to_string()), vec![2, 3])]
        );
        assert_eq!(r.matches("c"), RemoteMatch::default());
        assert_eq!(r.addr(3).as_deref(), Some("b3"));
    }

    #[test]
    fn local_filters_count_sessions() {
        let r = Routes::default();
        assert_eq!(r.local_filters(), None);
        r.serve();
        r.add_local("a/#");
        r.add_local("a/#");
        r.remove_local("a/#");
        assert_eq!(r.local_filters(), Some(vec!["a/#".to_string()]));
        r.remove_local("a/#");
        assert_eq!(r.local_filters(), Some(vec![]));
    }
}
