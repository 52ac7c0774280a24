//! The MQTT subscription index: a trie over topic-filter levels, mapping each
//! filter to the subscribers (keys) on it and their subscription options
//! (values), and answering "which subscriptions match this topic name".
//!
//! Our own rather than a crate's: no maintained crate offers a generic,
//! prunable filter trie with MQTT's `$`-topic rule, and the broker needs it to
//! survive hostile input: every walk (insert, match, remove, drop) is
//! iterative, so the deepest legal filter (65535 '/', i.e. 65536 empty
//! levels) cannot overflow the stack.

use std::collections::HashMap;
use std::hash::Hash;
use std::str::Split;

/// Subscriptions indexed by topic filter: a trie over filter levels.
pub(crate) struct Trie<K, V> {
    root: Node<K, V>,
    /// Number of (filter, key) pairs, kept so `len` is O(1).
    len: usize,
}

struct Node<K, V> {
    /// Children by literal level. std's SipHash is kept on purpose: levels
    /// come from clients, so a predictable hasher would invite collisions.
    literal: HashMap<Box<str>, Node<K, V>>,
    plus: Option<Box<Node<K, V>>>,
    /// A '#' level is always last, so this node only ever holds `subs`.
    hash: Option<Box<Node<K, V>>>,
    /// The filter ending at this node, stored once so `matches` can hand it
    /// out without building it from levels. `Some` exactly while `subs` is
    /// non-empty.
    filter: Option<Box<str>>,
    subs: HashMap<K, V>,
}

impl<K, V> Node<K, V> {
    fn new() -> Self {
        Node {
            literal: HashMap::new(),
            plus: None,
            hash: None,
            filter: None,
            subs: HashMap::new(),
        }
    }

    fn child_count(&self) -> usize {
        self.literal.len() + usize::from(self.plus.is_some()) + usize::from(self.hash.is_some())
    }

    /// Filter levels only: '+' and '#' name the wildcard slots. Topic levels
    /// must go through `literal` directly.
    fn child(&self, level: &str) -> Option<&Node<K, V>> {
        match level {
            "+" => self.plus.as_deref(),
            "#" => self.hash.as_deref(),
            l => self.literal.get(l),
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node<K, V>> {
        match level {
            "+" => self.plus.as_deref_mut(),
            "#" => self.hash.as_deref_mut(),
            l => self.literal.get_mut(l),
        }
    }

    fn take_child(&mut self, level: &str) -> Option<Node<K, V>> {
        match level {
            "+" => self.plus.take().map(|b| *b),
            "#" => self.hash.take().map(|b| *b),
            l => self.literal.remove(l),
        }
    }

    /// Pass every subscription ending at this node to `f`.
    fn report(&self, f: &mut impl FnMut(&str, &K, &V)) {
        if let Some(filter) = &self.filter {
            for (k, v) in &self.subs {
                f(filter, k, v);
            }
        }
    }
}

impl<K: Eq + Hash, V> Node<K, V> {
    fn child_or_insert(&mut self, level: &str) -> &mut Node<K, V> {
        match level {
            "+" => self.plus.get_or_insert_with(|| Box::new(Node::new())),
            "#" => self.hash.get_or_insert_with(|| Box::new(Node::new())),
            l => self.literal.entry(l.into()).or_insert_with(Node::new),
        }
    }
}

/// Free a subtree without recursion: the default drop of nested maps would
/// recurse once per level.
fn dismantle<K, V>(node: Node<K, V>) {
    let mut stack = vec![node];
    while let Some(mut n) = stack.pop() {
        stack.extend(n.literal.drain().map(|(_, child)| child));
        stack.extend(n.plus.take().map(|b| *b));
        stack.extend(n.hash.take().map(|b| *b));
        // `n` now has no children, so dropping it is shallow.
    }
}

impl<K, V> Drop for Trie<K, V> {
    fn drop(&mut self) {
        dismantle(std::mem::replace(&mut self.root, Node::new()));
    }
}

impl<K: Clone + Eq + Hash, V> Default for Trie<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Clone + Eq + Hash, V> Trie<K, V> {
    pub(crate) fn new() -> Self {
        Trie {
            root: Node::new(),
            len: 0,
        }
    }

    /// Add or replace `key`'s subscription to `filter`; returns the old value.
    /// `filter` must be a valid MQTT topic filter (the caller validates).
    pub(crate) fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.child_or_insert(level);
        }
        if node.filter.is_none() {
            node.filter = Some(filter.into());
        }
        let old = node.subs.insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Remove `key`'s subscription to `filter`; prunes empty nodes.
    pub(crate) fn remove(&mut self, filter: &str, key: &K) -> Option<V> {
        // Pass 1, read-only: find the subscription, and the deepest node on
        // the path that stays even if the branch below it goes (`cut`, its
        // depth). Iterative so that deep filters cannot overflow the stack.
        let mut node = &self.root;
        let mut cut = 0;
        for (depth, level) in filter.split('/').enumerate() {
            if !node.subs.is_empty() || node.child_count() > 1 {
                cut = depth;
            }
            node = node.child(level)?;
        }
        if !node.subs.contains_key(key) {
            return None;
        }
        let prune = node.subs.len() == 1 && node.child_count() == 0;

        // Pass 2: take the value.
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.child_mut(level)?;
        }
        let value = node.subs.remove(key)?;
        self.len -= 1;
        if node.subs.is_empty() {
            node.filter = None;
        }

        // Pass 3: detach the now-empty branch below `cut`.
        if prune {
            let mut levels = filter.split('/');
            let mut node = &mut self.root;
            for level in levels.by_ref().take(cut) {
                match node.child_mut(level) {
                    Some(child) => node = child,
                    None => return Some(value),
                }
            }
            if let Some(branch) = levels.next().and_then(|level| node.take_child(level)) {
                dismantle(branch);
            }
        }
        Some(value)
    }

    /// Call `f(filter, key, value)` for every subscription whose filter matches
    /// the topic name `topic`. Each matching (filter, key) is reported once;
    /// the order is unspecified.
    pub(crate) fn matches(&self, topic: &str, mut f: impl FnMut(&str, &K, &V)) {
        // Walk one path in a loop; where a level has both a literal and a '+'
        // child, park the '+' branch. The stack is only allocated at such a
        // fork and is at most as deep as the trie, never the call stack.
        type Cursor<'a, K, V> = (&'a Node<K, V>, Split<'a, char>);
        let mut parked: Vec<Cursor<'_, K, V>> = Vec::new();
        // MQTT §4.7.2: wildcards in the first level never match a topic
        // starting with '$' (e.g. "$SYS/..."). `wild` is false only at the root.
        let mut current = Some((&self.root, topic.split('/')));
        let mut wild = !topic.starts_with('$');
        while let Some((mut node, mut rest)) = current.take().or_else(|| parked.pop()) {
            loop {
                let Some(level) = rest.next() else {
                    node.report(&mut f);
                    // '#' also matches its parent level: "a/#" matches "a".
                    if let Some(hash) = &node.hash {
                        hash.report(&mut f);
                    }
                    break;
                };
                let plus = if wild {
                    if let Some(hash) = &node.hash {
                        hash.report(&mut f);
                    }
                    node.plus.as_deref()
                } else {
                    None
                };
                wild = true;
                match (node.literal.get(level), plus) {
                    (Some(lit), Some(plus)) => {
                        parked.push((plus, rest.clone()));
                        node = lit;
                    }
                    (Some(next), None) | (None, Some(next)) => node = next,
                    (None, None) => break,
                }
            }
        }
    }

    /// Number of (filter, key) subscriptions.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every distinct filter that has at least one subscription (for route
    /// aggregation), in unspecified order.
    #[cfg(test)]
    pub(crate) fn filters(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![&self.root];
        while let Some(node) = stack.pop() {
            if let Some(filter) = &node.filter {
                out.push(filter.to_string());
            }
            stack.extend(node.literal.values());
            stack.extend(node.plus.as_deref());
            stack.extend(node.hash.as_deref());
        }
        out
    }

    /// Nodes in the trie, root included; lets tests check pruning.
    #[cfg(test)]
    fn node_count(&self) -> usize {
        let mut count = 0;
        let mut stack = vec![&self.root];
        while let Some(node) = stack.pop() {
            count += 1;
            stack.extend(node.literal.values());
            stack.extend(node.plus.as_deref());
            stack.extend(node.hash.as_deref());
        }
        count
    }
}

#[cfg(test)]
mod tests {
    use super::Trie;
    use rand::rngs::StdRng;
    use rand::seq::IndexedRandom;
    use rand::{Rng, SeedableRng};
    use std::collections::{BTreeMap, BTreeSet};

    /// The (filter, key) pairs `trie` reports for `topic`, sorted; panics on
    /// a pair reported twice.
    fn matched(trie: &Trie<u32, u32>, topic: &str) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        trie.matches(topic, |filter, key, _| out.push((filter.to_string(), *key)));
        let n = out.len();
        out.sort();
        out.dedup();
        assert_eq!(n, out.len(), "duplicate report for {topic:?}: {out:?}");
        out
    }

    /// The filters (key 0) that match `topic`.
    fn filters_for(trie: &Trie<u32, u32>, topic: &str) -> Vec<String> {
        matched(trie, topic).into_iter().map(|(f, _)| f).collect()
    }

    fn trie_of(filters: &[&str]) -> Trie<u32, u32> {
        let mut trie = Trie::new();
        for filter in filters {
            trie.insert(filter, 0, 0);
        }
        trie
    }

    fn sorted(v: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn exact_filters_match_only_themselves() {
        let trie = trie_of(&["a/b", "a", "a/b/c"]);
        assert_eq!(filters_for(&trie, "a/b"), sorted(&["a/b"]));
        assert_eq!(filters_for(&trie, "a"), sorted(&["a"]));
        assert!(filters_for(&trie, "a/c").is_empty());
        assert!(filters_for(&trie, "b").is_empty());
    }

    #[test]
    fn plus_matches_exactly_one_level() {
        let trie = trie_of(&["a/+", "+/b", "+", "a/+/c"]);
        assert_eq!(filters_for(&trie, "a/x"), sorted(&["a/+"]));
        assert_eq!(filters_for(&trie, "a/b"), sorted(&["a/+", "+/b"]));
        assert_eq!(filters_for(&trie, "a"), sorted(&["+"]));
        assert_eq!(filters_for(&trie, "a/x/c"), sorted(&["a/+/c"]));
        assert!(filters_for(&trie, "a/x/y").is_empty());
    }

    #[test]
    fn plus_matches_an_empty_level() {
        let trie = trie_of(&["a/+", "+/a", "+/+"]);
        assert_eq!(filters_for(&trie, "a/"), sorted(&["a/+", "+/+"]));
        assert_eq!(filters_for(&trie, "/a"), sorted(&["+/a", "+/+"]));
        assert_eq!(filters_for(&trie, "/"), sorted(&["+/+"]));
    }

    #[test]
    fn hash_matches_all_descendants_and_the_parent() {
        let trie = trie_of(&["sport/#", "sport/tennis/#"]);
        assert_eq!(filters_for(&trie, "sport"), sorted(&["sport/#"]));
        assert_eq!(filters_for(&trie, "sport/x"), sorted(&["sport/#"]));
        assert_eq!(
            filters_for(&trie, "sport/tennis"),
            sorted(&["sport/#", "sport/tennis/#"])
        );
        assert_eq!(
            filters_for(&trie, "sport/tennis/p1/x"),
            sorted(&["sport/#", "sport/tennis/#"])
        );
        assert!(filters_for(&trie, "sports").is_empty());
        // The parent match is of the level before '#', not of an empty one.
        assert!(filters_for(&trie, "spor").is_empty());
    }

    #[test]
    fn root_hash_matches_everything_not_dollar() {
        let trie = trie_of(&["#"]);
        for topic in ["a", "a/b/c", "/", "/a", "a//b", "a/$x"] {
            assert_eq!(filters_for(&trie, topic), sorted(&["#"]), "{topic:?}");
        }
    }

    #[test]
    fn plus_then_hash_matches_one_or_more_levels() {
        let trie = trie_of(&["+/#"]);
        assert_eq!(filters_for(&trie, "a"), sorted(&["+/#"]));
        assert_eq!(filters_for(&trie, "a/b/c"), sorted(&["+/#"]));
        assert!(filters_for(&trie, "$a").is_empty());
    }

    #[test]
    fn empty_levels_are_levels() {
        let trie = trie_of(&["a//b", "/a", "a/", "/", "a/b"]);
        assert_eq!(filters_for(&trie, "a//b"), sorted(&["a//b"]));
        assert_eq!(filters_for(&trie, "/a"), sorted(&["/a"]));
        assert_eq!(filters_for(&trie, "a/"), sorted(&["a/"]));
        assert_eq!(filters_for(&trie, "/"), sorted(&["/"]));
        assert_eq!(filters_for(&trie, "a/b"), sorted(&["a/b"]));
        assert!(filters_for(&trie, "a").is_empty());
        assert!(filters_for(&trie, "a///b").is_empty());
    }

    #[test]
    fn dollar_topics_escape_first_level_wildcards() {
        let trie = trie_of(&["#", "+/x", "+", "+/#", "$SYS/#", "$SYS/+", "$SYS/x"]);
        assert_eq!(
            filters_for(&trie, "$SYS/x"),
            sorted(&["$SYS/#", "$SYS/+", "$SYS/x"])
        );
        assert_eq!(filters_for(&trie, "$SYS"), sorted(&["$SYS/#"]));
        assert!(filters_for(&trie, "$other").is_empty());
        // Only the first level counts: '$' deeper down is an ordinary level.
        assert_eq!(filters_for(&trie, "a/x"), sorted(&["#", "+/x", "+/#"]));
        let trie = trie_of(&["a/+", "a/#"]);
        assert_eq!(filters_for(&trie, "a/$x"), sorted(&["a/+", "a/#"]));
    }

    #[test]
    fn insert_replaces_and_returns_the_old_value() {
        let mut trie: Trie<u32, &str> = Trie::new();
        assert_eq!(trie.insert("a/+", 1, "qos0"), None);
        assert_eq!(trie.insert("a/+", 1, "qos1"), Some("qos0"));
        assert_eq!(trie.len(), 1);
        let mut seen = Vec::new();
        trie.matches("a/b", |f, k, v| seen.push((f.to_string(), *k, *v)));
        assert_eq!(seen, vec![("a/+".to_string(), 1, "qos1")]);
    }

    #[test]
    fn remove_returns_the_value_and_prunes() {
        let mut trie: Trie<u32, u32> = Trie::new();
        assert_eq!(trie.node_count(), 1);
        trie.insert("a/b/c/d", 1, 10);
        assert_eq!(trie.node_count(), 5);
        trie.insert("a/b/x", 1, 11);
        assert_eq!(trie.node_count(), 6);
        trie.insert("a/b", 2, 12);
        trie.insert("a/+/#", 2, 13);
        assert_eq!(trie.node_count(), 8);

        assert_eq!(trie.remove("a/b/c/d", &1), Some(10));
        // "c" and "d" go; "a/b" stays, it has a subscription and a child.
        assert_eq!(trie.node_count(), 6);
        assert!(filters_for(&trie, "a/b/c/d").contains(&"a/+/#".to_string()));
        assert_eq!(trie.remove("a/b", &2), Some(12));
        // "a/b" stays as an internal node for "a/b/x".
        assert_eq!(trie.node_count(), 6);
        assert_eq!(trie.remove("a/b/x", &1), Some(11));
        assert_eq!(trie.node_count(), 4);
        assert_eq!(trie.remove("a/+/#", &2), Some(13));
        assert_eq!(trie.node_count(), 1);
        assert!(trie.is_empty());
        assert!(trie.filters().is_empty());
        assert!(matched(&trie, "a/b").is_empty());
    }

    #[test]
    fn remove_of_absent_subscription_changes_nothing() {
        let mut trie: Trie<u32, u32> = Trie::new();
        trie.insert("a/b", 1, 10);
        assert_eq!(trie.remove("a/b", &2), None);
        assert_eq!(trie.remove("a", &1), None);
        assert_eq!(trie.remove("a/b/c", &1), None);
        assert_eq!(trie.remove("a/+", &1), None);
        assert_eq!(trie.len(), 1);
        assert_eq!(trie.node_count(), 3);
        assert_eq!(matched(&trie, "a/b"), vec![("a/b".to_string(), 1)]);
    }

    #[test]
    fn churn_does_not_grow_the_trie() {
        let mut trie: Trie<u32, ()> = Trie::new();
        trie.insert("keep/#", 0, ());
        let base = trie.node_count();
        for i in 0..1000 {
            let filter = format!("keep/{i}/+/x{i}");
            trie.insert(&filter, i, ());
            assert_eq!(trie.remove(&filter, &i), Some(()));
        }
        assert_eq!(trie.node_count(), base);
        assert_eq!(trie.len(), 1);
    }

    #[test]
    fn many_keys_on_one_filter() {
        let mut trie: Trie<u32, u32> = Trie::new();
        for key in 0..3 {
            trie.insert("a/+", key, key * 10);
        }
        assert_eq!(trie.len(), 3);
        assert_eq!(trie.filters(), vec!["a/+".to_string()]);
        let want: Vec<(String, u32)> = (0..3).map(|k| ("a/+".to_string(), k)).collect();
        assert_eq!(matched(&trie, "a/b"), want);
        assert_eq!(trie.remove("a/+", &1), Some(10));
        // The filter survives while any key is on it.
        assert_eq!(trie.filters(), vec!["a/+".to_string()]);
        assert_eq!(matched(&trie, "a/b").len(), 2);
    }

    #[test]
    fn one_key_on_overlapping_filters_is_reported_per_filter() {
        let mut trie: Trie<u32, u32> = Trie::new();
        for filter in ["a/b", "a/+", "a/#", "#", "+/b", "+/+"] {
            trie.insert(filter, 7, 0);
        }
        let got = matched(&trie, "a/b");
        let mut want: Vec<(String, u32)> = ["a/b", "a/+", "a/#", "#", "+/b", "+/+"]
            .iter()
            .map(|f| (f.to_string(), 7))
            .collect();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn filters_and_len_track_subscriptions() {
        let mut trie: Trie<u32, u32> = Trie::new();
        trie.insert("a", 1, 0);
        trie.insert("a", 2, 0);
        trie.insert("a/#", 1, 0);
        trie.insert("/", 1, 0);
        trie.insert("a", 1, 5);
        assert_eq!(trie.len(), 4);
        let mut filters = trie.filters();
        filters.sort();
        assert_eq!(filters, sorted(&["a", "a/#", "/"]));
    }

    #[test]
    fn deep_filters_do_not_overflow_the_stack() {
        // 65535 bytes, the MQTT maximum: 65536 empty levels.
        let deep = "/".repeat(65535);
        let plus_deep = vec!["+"; 32768].join("/");
        let mut trie: Trie<u32, u32> = Trie::new();
        trie.insert(&deep, 1, 0);
        trie.insert(&plus_deep, 1, 0);
        assert_eq!(filters_for(&trie, &deep), sorted(&[deep.as_str()]));
        let topic = "/".repeat(32767);
        assert_eq!(filters_for(&trie, &topic), sorted(&[plus_deep.as_str()]));
        assert_eq!(trie.remove(&deep, &1), Some(0));
        assert_eq!(trie.node_count(), 32769);
        // Dropping the rest must not recurse either.
        drop(trie);
    }

    /// Random filters and topics over a small alphabet, so that matches are
    /// common, checked against `mqtt5_protocol`'s matcher; random removals
    /// check pruning and bookkeeping along the way. Seeded, so reproducible.
    #[test]
    fn randomized_against_oracle() {
        const LEVELS: &[&str] = &["a", "b", "", "$x"];
        const FILTER_LEVELS: &[&str] = &["a", "b", "", "$x", "+", "+"];

        fn levels(rng: &mut StdRng, alphabet: &[&str]) -> Vec<String> {
            let n = rng.random_range(1..=4);
            (0..n)
                .map(|_| alphabet.choose(rng).map_or("a", |l| l).to_string())
                .collect()
        }
        fn filter(rng: &mut StdRng) -> String {
            let mut levels = levels(rng, FILTER_LEVELS);
            if rng.random_bool(0.3) {
                if rng.random_bool(0.5) {
                    levels.push("#".into());
                } else if let Some(last) = levels.last_mut() {
                    *last = "#".into();
                }
            }
            levels.join("/")
        }

        let mut rng = StdRng::seed_from_u64(0x5ea1_7e57);
        let mut compared = 0usize;
        let mut hits = 0usize;
        let mut dollar = 0usize;
        for _ in 0..2000 {
            let mut trie: Trie<u32, u32> = Trie::new();
            let mut model: BTreeMap<(String, u32), u32> = BTreeMap::new();
            for _ in 0..rng.random_range(1..=12) {
                let f = filter(&mut rng);
                // The empty filter is invalid (MQTT §4.7.3: at least one
                // character); the caller rejects it, so it is not generated.
                if f.is_empty() {
                    continue;
                }
                let key = rng.random_range(0..3);
                let value = rng.random();
                assert_eq!(trie.insert(&f, key, value), model.insert((f, key), value));
            }
            // Remove some, including pairs that were never inserted.
            for _ in 0..rng.random_range(0..6) {
                let (f, key) = match model.keys().nth(rng.random_range(0..=model.len())) {
                    Some((f, k)) if rng.random_bool(0.8) => (f.clone(), *k),
                    _ => (filter(&mut rng), rng.random_range(0..3)),
                };
                assert_eq!(trie.remove(&f, &key), model.remove(&(f, key)));
            }
            assert_eq!(trie.len(), model.len());
            let mut filters = trie.filters();
            filters.sort();
            let want: BTreeSet<&String> = model.keys().map(|(f, _)| f).collect();
            assert_eq!(filters, want.into_iter().cloned().collect::<Vec<_>>());

            for _ in 0..10 {
                let topic = levels(&mut rng, LEVELS).join("/");
                // The empty topic is invalid (MQTT §4.7.3) and the oracle
                // rejects it, so it is not compared.
                if topic.is_empty() {
                    continue;
                }
                let want: Vec<(String, u32)> = model
                    .keys()
                    .filter(|(f, _)| mqtt5_protocol::topic_matching::matches(&topic, f))
                    .cloned()
                    .collect();
                let got = matched(&trie, &topic);
                assert_eq!(got, want, "topic {topic:?}, filters {:?}", model.keys());
                compared += 1;
                hits += got.len();
                if topic.starts_with('$') && model.keys().any(|(f, _)| f.starts_with(['+', '#'])) {
                    dollar += 1;
                }
            }

            // Removing everything leaves only the root.
            for (f, key) in std::mem::take(&mut model).into_keys() {
                assert!(trie.remove(&f, &key).is_some());
            }
            assert!(trie.is_empty());
            assert_eq!(trie.node_count(), 1);
        }
        // Guard against a generator that stops producing matches or
        // '$'-topics facing first-level wildcards.
        assert!(
            compared > 15_000 && hits > compared / 4 && dollar > 1_000,
            "{compared} {hits} {dollar}"
        );
    }
}
