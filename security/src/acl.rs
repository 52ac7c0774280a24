//! Kafka's access-control model, pure: ACL bindings (resource, pattern,
//! principal, host, operation, allow/deny), the filters CreateAcls,
//! DescribeAcls and DeleteAcls use, and the authorizer's decision: super
//! users pass, deny wins over allow, some operations imply DESCRIBE, and a
//! resource no ACL matches is open only when `allow.everyone.if.no.acl.found`.

use serde::{Deserialize, Serialize};

macro_rules! kafka_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $code:expr),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
        pub enum $name { $($variant),* }

        impl $name {
            /// Kafka's wire code.
            pub fn code(self) -> i8 {
                match self { $($name::$variant => $code),* }
            }
            pub fn from_code(code: i8) -> Option<Self> {
                match code { $($code => Some($name::$variant),)* _ => None }
            }
        }
    };
}

kafka_enum!(
    /// Kafka's resource types (and ANY, for filters).
    ResourceType { Any = 1, Topic = 2, Group = 3, Cluster = 4, TransactionalId = 5 }
);
kafka_enum!(
    /// LITERAL and PREFIXED for bindings; ANY and MATCH for filters.
    PatternType { Any = 1, Match = 2, Literal = 3, Prefixed = 4 }
);
kafka_enum!(
    Operation {
        Any = 1, All = 2, Read = 3, Write = 4, Create = 5, Delete = 6, Alter = 7,
        Describe = 8, ClusterAction = 9, DescribeConfigs = 10, AlterConfigs = 11,
        IdempotentWrite = 12,
    }
);
kafka_enum!(Permission { Any = 1, Deny = 2, Allow = 3 });

/// The cluster resource's one name.
pub const CLUSTER: &str = "kafka-cluster";
const WILDCARD: &str = "*";

/// One ACL.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AclBinding {
    pub resource_type: ResourceType,
    pub resource_name: String,
    pub pattern: PatternType,
    /// `User:alice`, or `User:*` for everyone.
    pub principal: String,
    /// A client address, or `*`.
    pub host: String,
    pub operation: Operation,
    pub permission: Permission,
}

impl AclBinding {
    /// Why CreateAcls must refuse this binding, if it must.
    pub fn invalid(&self) -> Option<&'static str> {
        if matches!(self.resource_type, ResourceType::Any) {
            return Some("the resource type must be specific");
        }
        if !matches!(self.pattern, PatternType::Literal | PatternType::Prefixed) {
            return Some("the pattern type must be LITERAL or PREFIXED");
        }
        if matches!(self.operation, Operation::Any) || matches!(self.permission, Permission::Any) {
            return Some("the operation and permission must be specific");
        }
        if self.resource_name.is_empty() {
            return Some("the resource name is empty");
        }
        if !self.principal.contains(':') {
            return Some("the principal must be TYPE:NAME, e.g. User:alice");
        }
        if self.resource_type == ResourceType::Cluster && self.resource_name != CLUSTER {
            return Some("the cluster resource is named kafka-cluster");
        }
        None
    }
}

/// What DescribeAcls and DeleteAcls select; `None` matches anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclFilter {
    pub resource_type: ResourceType,
    pub resource_name: Option<String>,
    pub pattern: PatternType,
    pub principal: Option<String>,
    pub host: Option<String>,
    pub operation: Operation,
    pub permission: Permission,
}

impl AclFilter {
    pub fn matches(&self, b: &AclBinding) -> bool {
        let resource_type =
            self.resource_type == ResourceType::Any || self.resource_type == b.resource_type;
        let name_and_pattern = match (self.pattern, &self.resource_name) {
            (PatternType::Any, None) => true,
            (PatternType::Any, Some(n)) => *n == b.resource_name,
            // MATCH: the bindings that would apply to a resource of this name.
            (PatternType::Match, None) => true,
            (PatternType::Match, Some(n)) => match b.pattern {
                PatternType::Literal => b.resource_name == *n || b.resource_name == WILDCARD,
                PatternType::Prefixed => n.starts_with(&b.resource_name),
                _ => false,
            },
            (p, n) => p == b.pattern && n.as_ref().is_none_or(|n| *n == b.resource_name),
        };
        resource_type
            && name_and_pattern
            && self.principal.as_ref().is_none_or(|p| *p == b.principal)
            && self.host.as_ref().is_none_or(|h| *h == b.host)
            && (self.operation == Operation::Any || self.operation == b.operation)
            && (self.permission == Permission::Any || self.permission == b.permission)
    }
}

/// The authorizer's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthorizerConfig {
    /// Principals allowed everything (`User:admin`).
    pub super_users: Vec<String>,
    /// Kafka's `allow.everyone.if.no.acl.found` (default false).
    pub allow_if_no_acl: bool,
}

/// Does `principal` at `host` may do `op` on the resource?
pub fn authorize<'a>(
    acls: impl IntoIterator<Item = &'a AclBinding> + Clone,
    config: &AuthorizerConfig,
    principal: &str,
    host: &str,
    op: Operation,
    resource_type: ResourceType,
    name: &str,
) -> bool {
    if config.super_users.iter().any(|s| s == principal) {
        return true;
    }
    let applies = |b: &&AclBinding| {
        b.resource_type == resource_type
            && match b.pattern {
                PatternType::Literal => b.resource_name == name || b.resource_name == WILDCARD,
                PatternType::Prefixed => name.starts_with(&b.resource_name),
                _ => false,
            }
    };
    let mut any = false;
    let mut allowed = false;
    let user_wildcard = principal
        .split_once(':')
        .map(|(kind, _)| format!("{kind}:*"));
    for b in acls.into_iter().filter(applies) {
        any = true;
        let who = b.principal == principal || Some(&b.principal) == user_wildcard.as_ref();
        let from = b.host == WILDCARD || b.host == host;
        if !who || !from {
            continue;
        }
        match b.permission {
            Permission::Deny if b.operation == op || b.operation == Operation::All => {
                return false;
            }
            Permission::Allow if grants(b.operation, op) => allowed = true,
            _ => {}
        }
    }
    allowed || (!any && config.allow_if_no_acl)
}

/// Does an ALLOW of `granted` cover `wanted`? ALL covers everything; READ,
/// WRITE, DELETE and ALTER imply DESCRIBE; ALTER_CONFIGS implies
/// DESCRIBE_CONFIGS (as in Kafka).
fn grants(granted: Operation, wanted: Operation) -> bool {
    use Operation as O;
    granted == wanted
        || granted == O::All
        || (wanted == O::Describe && matches!(granted, O::Read | O::Write | O::Delete | O::Alter))
        || (wanted == O::DescribeConfigs && granted == O::AlterConfigs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(
        name: &str,
        pattern: PatternType,
        who: &str,
        op: Operation,
        perm: Permission,
    ) -> AclBinding {
        AclBinding {
            resource_type: ResourceType::Topic,
            resource_name: name.into(),
            pattern,
            principal: who.into(),
            host: "*".into(),
            operation: op,
            permission: perm,
        }
    }

    fn can(acls: &[AclBinding], who: &str, op: Operation, topic: &str) -> bool {
        authorize(
            acls,
            &AuthorizerConfig::default(),
            who,
            "10.0.0.1",
            op,
            ResourceType::Topic,
            topic,
        )
    }

    #[test]
    fn prefixed_allow_and_implied_describe() {
        let acls = [acl(
            "orders-",
            PatternType::Prefixed,
            "User:alice",
            Operation::Write,
            Permission::Allow,
        )];
        assert!(can(&acls, "User:alice", Operation::Write, "orders-eu"));
        assert!(can(&acls, "User:alice", Operation::Describe, "orders-eu"));
        assert!(!can(&acls, "User:alice", Operation::Read, "orders-eu"));
        assert!(!can(&acls, "User:alice", Operation::Write, "payments"));
        assert!(!can(&acls, "User:bob", Operation::Write, "orders-eu"));
    }

    #[test]
    fn deny_wins_and_wildcards_apply() {
        let acls = [
            acl(
                "*",
                PatternType::Literal,
                "User:*",
                Operation::All,
                Permission::Allow,
            ),
            acl(
                "secret",
                PatternType::Literal,
                "User:bob",
                Operation::Read,
                Permission::Deny,
            ),
        ];
        assert!(can(&acls, "User:bob", Operation::Read, "public"));
        assert!(!can(&acls, "User:bob", Operation::Read, "secret"));
        assert!(can(&acls, "User:alice", Operation::Read, "secret"));
    }

    #[test]
    fn no_acl_found_and_super_users() {
        let none: [AclBinding; 0] = [];
        assert!(!can(&none, "User:alice", Operation::Read, "t"));
        let open = AuthorizerConfig {
            allow_if_no_acl: true,
            ..Default::default()
        };
        assert!(authorize(
            &none,
            &open,
            "User:a",
            "h",
            Operation::Read,
            ResourceType::Topic,
            "t"
        ));
        // A resource some ACL matches is not "no ACL found".
        let acls = [acl(
            "t",
            PatternType::Literal,
            "User:bob",
            Operation::Read,
            Permission::Allow,
        )];
        assert!(!authorize(
            &acls,
            &open,
            "User:a",
            "h",
            Operation::Read,
            ResourceType::Topic,
            "t"
        ));
        let sup = AuthorizerConfig {
            super_users: vec!["User:admin".into()],
            ..Default::default()
        };
        assert!(authorize(
            &none,
            &sup,
            "User:admin",
            "h",
            Operation::Alter,
            ResourceType::Cluster,
            CLUSTER
        ));
    }

    #[test]
    fn filters_select_bindings() {
        let b = acl(
            "orders-",
            PatternType::Prefixed,
            "User:alice",
            Operation::Write,
            Permission::Allow,
        );
        let any = AclFilter {
            resource_type: ResourceType::Any,
            resource_name: None,
            pattern: PatternType::Any,
            principal: None,
            host: None,
            operation: Operation::Any,
            permission: Permission::Any,
        };
        assert!(any.matches(&b));
        let matching = AclFilter {
            resource_name: Some("orders-eu".into()),
            pattern: PatternType::Match,
            ..any.clone()
        };
        assert!(matching.matches(&b));
        let literal = AclFilter {
            resource_name: Some("orders-".into()),
            pattern: PatternType::Literal,
            ..any
        };
        assert!(!literal.matches(&b));
        assert!(b.invalid().is_none());
    }
}
