//! Topic names and filters: validity (MQTT §4.7) and matching one name
//! against one filter (the retained-message scan; subscriptions go through
//! the trie).

/// Longest topic name or filter accepted, in bytes (the string length
/// field's limit).
const MAX_LEN: usize = 65_535;

/// A topic name a client may publish to: non-empty, no wildcards, no NUL.
pub(crate) fn valid_name(t: &str) -> bool {
    !t.is_empty() && t.len() <= MAX_LEN && !t.contains(['+', '#', '\0'])
}

/// A topic filter: '+' only as a whole level, '#' only as the whole last
/// level. A shared subscription (`$share/{group}/{filter}`) needs a group
/// name without wildcards and a valid filter after it.
pub(crate) fn valid_filter(f: &str) -> bool {
    if f.is_empty() || f.len() > MAX_LEN || f.contains('\0') {
        return false;
    }
    if let Some(rest) = f.strip_prefix("$share/") {
        return match rest.split_once('/') {
            Some((group, inner)) => {
                !group.is_empty() && !group.contains(['+', '#']) && valid_plain_filter(inner)
            }
            None => false,
        };
    }
    valid_plain_filter(f)
}

fn valid_plain_filter(f: &str) -> bool {
    if f.is_empty() {
        return false;
    }
    let mut levels = f.split('/').peekable();
    while let Some(level) = levels.next() {
        match level {
            "+" => {}
            "#" => return levels.peek().is_none(),
            l if l.contains(['+', '#']) => return false,
            _ => {}
        }
    }
    true
}

/// Does topic name `topic` match filter `filter` (MQTT §4.7)? Topics
/// starting with '$' are not matched by a leading wildcard.
pub(crate) fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    let mut f = filter.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_filters() {
        assert!(valid_name("a/b") && valid_name("/") && valid_name("$SYS/x"));
        assert!(!valid_name("") && !valid_name("a/+") && !valid_name("a/#"));
        for ok in [
            "#",
            "+",
            "a/+/b",
            "a/#",
            "/+",
            "+/+",
            "$share/g/a/#",
            "a//b",
        ] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in [
            "",
            "a#",
            "a/#/b",
            "a+/b",
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/g/",
        ] {
            assert!(!valid_filter(bad), "{bad}");
        }
    }

    #[test]
    fn matching() {
        assert!(matches("sport/tennis", "sport/#"));
        assert!(matches("sport", "sport/#"));
        assert!(matches("sport/", "sport/+"));
        assert!(!matches("sport", "sport/+"));
        assert!(matches("/finance", "+/+"));
        assert!(!matches("$SYS/x", "#"));
        assert!(!matches("$SYS/x", "+/x"));
        assert!(matches("$SYS/x", "$SYS/#"));
        assert!(!matches("a/b/c", "a/+"));
    }
}
