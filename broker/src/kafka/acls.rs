//! CreateAcls, DescribeAcls and DeleteAcls: Kafka's ACLs, kept in
//! placement and followed by every broker.

use std::collections::BTreeMap;

use kafka_protocol::ResponseError;
use kafka_protocol::messages::create_acls_response::AclCreationResult;
use kafka_protocol::messages::delete_acls_response::{
    DeleteAclsFilterResult, DeleteAclsMatchingAcl,
};
use kafka_protocol::messages::describe_acls_response::{AclDescription, DescribeAclsResource};
use kafka_protocol::messages::{
    CreateAclsRequest, CreateAclsResponse, DeleteAclsRequest, DeleteAclsResponse,
    DescribeAclsRequest, DescribeAclsResponse, ResponseKind,
};
use kafka_protocol::protocol::StrBytes;
use shoal_placement::{Command, Reply};
use shoal_security::acl::{
    AclBinding, AclFilter, Operation, PatternType, Permission, ResourceType,
};

use super::conn::Ctx;
use super::{Pending, ready};

fn text(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

/// A request's codes as a filter; `None` when a code is unknown.
fn filter(
    rt: i8,
    name: Option<&StrBytes>,
    pattern: i8,
    principal: Option<&StrBytes>,
    host: Option<&StrBytes>,
    op: i8,
    perm: i8,
) -> Option<AclFilter> {
    Some(AclFilter {
        resource_type: ResourceType::from_code(rt)?,
        resource_name: name.map(|n| n.to_string()),
        pattern: PatternType::from_code(pattern)?,
        principal: principal.map(|p| p.to_string()),
        host: host.map(|h| h.to_string()),
        operation: Operation::from_code(op)?,
        permission: Permission::from_code(perm)?,
    })
}

/// Without an authorizer ACLs mean nothing: Kafka answers
/// SECURITY_DISABLED; with one, the caller lacked the cluster right.
fn refusal(ctx: &Ctx) -> (ResponseError, &'static str) {
    if ctx.broker.config.authorizer.is_none() {
        (
            ResponseError::SecurityDisabled,
            "no authorizer is configured (--authorizer)",
        )
    } else {
        (ResponseError::ClusterAuthorizationFailed, "not authorized")
    }
}

pub async fn create(ctx: &Ctx, req: CreateAclsRequest) -> Pending {
    let refused = |code: ResponseError, msg: &'static str| {
        AclCreationResult::default()
            .with_error_code(code.code())
            .with_error_message(Some(StrBytes::from_static_str(msg)))
    };
    if ctx.broker.config.authorizer.is_none() || !ctx.allowed_cluster(Operation::Alter) {
        let (code, msg) = refusal(ctx);
        let results = req.creations.iter().map(|_| refused(code, msg)).collect();
        return ready(ResponseKind::CreateAcls(
            CreateAclsResponse::default().with_results(results),
        ));
    }
    let mut results = Vec::with_capacity(req.creations.len());
    for c in &req.creations {
        let binding = filter(
            c.resource_type,
            Some(&c.resource_name),
            c.resource_pattern_type,
            Some(&c.principal),
            Some(&c.host),
            c.operation,
            c.permission_type,
        )
        .map(|f| AclBinding {
            resource_type: f.resource_type,
            resource_name: f.resource_name.unwrap_or_default(),
            pattern: f.pattern,
            principal: f.principal.unwrap_or_default(),
            host: f.host.unwrap_or_default(),
            operation: f.operation,
            permission: f.permission,
        });
        let Some(binding) = binding else {
            results.push(refused(
                ResponseError::InvalidRequest,
                "unknown code in the ACL",
            ));
            continue;
        };
        if let Some(why) = binding.invalid() {
            results.push(refused(ResponseError::InvalidRequest, why));
            continue;
        }
        let outcome = ctx
            .broker
            .placement
            .write(Command::CreateAcls {
                bindings: vec![binding],
            })
            .await;
        results.push(match outcome {
            Ok(Reply::Done) => AclCreationResult::default(),
            Ok(_) => refused(ResponseError::InvalidRequest, "placement refused the ACL"),
            Err(e) => {
                tracing::warn!("CreateAcls: {e}");
                refused(
                    ResponseError::UnknownServerError,
                    "placement is unavailable",
                )
            }
        });
    }
    crate::security::refresh(&ctx.broker).await;
    ready(ResponseKind::CreateAcls(
        CreateAclsResponse::default().with_results(results),
    ))
}

pub fn describe(ctx: &Ctx, req: DescribeAclsRequest) -> Pending {
    let resp = DescribeAclsResponse::default();
    if ctx.broker.config.authorizer.is_none() || !ctx.allowed_cluster(Operation::Describe) {
        let (code, msg) = refusal(ctx);
        return ready(ResponseKind::DescribeAcls(
            resp.with_error_code(code.code())
                .with_error_message(Some(StrBytes::from_static_str(msg))),
        ));
    }
    let Some(f) = filter(
        req.resource_type_filter,
        req.resource_name_filter.as_ref(),
        req.pattern_type_filter,
        req.principal_filter.as_ref(),
        req.host_filter.as_ref(),
        req.operation,
        req.permission_type,
    ) else {
        return ready(ResponseKind::DescribeAcls(
            resp.with_error_code(ResponseError::InvalidRequest.code())
                .with_error_message(Some(StrBytes::from_static_str(
                    "unknown code in the filter",
                ))),
        ));
    };
    let security = ctx.broker.users.snapshot();
    let mut by_resource: BTreeMap<(ResourceType, &str, PatternType), Vec<AclDescription>> =
        BTreeMap::new();
    for b in security.acls.iter().filter(|b| f.matches(b)) {
        by_resource
            .entry((b.resource_type, &b.resource_name, b.pattern))
            .or_default()
            .push(
                AclDescription::default()
                    .with_principal(text(&b.principal))
                    .with_host(text(&b.host))
                    .with_operation(b.operation.code())
                    .with_permission_type(b.permission.code()),
            );
    }
    let resources = by_resource
        .into_iter()
        .map(|((rt, name, pattern), acls)| {
            DescribeAclsResource::default()
                .with_resource_type(rt.code())
                .with_resource_name(text(name))
                .with_pattern_type(pattern.code())
                .with_acls(acls)
        })
        .collect();
    ready(ResponseKind::DescribeAcls(resp.with_resources(resources)))
}

pub async fn delete(ctx: &Ctx, req: DeleteAclsRequest) -> Pending {
    let failed = |code: ResponseError, msg: &'static str| {
        DeleteAclsFilterResult::default()
            .with_error_code(code.code())
            .with_error_message(Some(StrBytes::from_static_str(msg)))
    };
    if ctx.broker.config.authorizer.is_none() || !ctx.allowed_cluster(Operation::Alter) {
        let (code, msg) = refusal(ctx);
        let results = req.filters.iter().map(|_| failed(code, msg)).collect();
        return ready(ResponseKind::DeleteAcls(
            DeleteAclsResponse::default().with_filter_results(results),
        ));
    }
    let filters: Vec<Option<AclFilter>> = req
        .filters
        .iter()
        .map(|f| {
            filter(
                f.resource_type_filter,
                f.resource_name_filter.as_ref(),
                f.pattern_type_filter,
                f.principal_filter.as_ref(),
                f.host_filter.as_ref(),
                f.operation,
                f.permission_type,
            )
        })
        .collect();
    let valid: Vec<AclFilter> = filters.iter().flatten().cloned().collect();
    let deleted = match ctx
        .broker
        .placement
        .write(Command::DeleteAcls { filters: valid })
        .await
    {
        Ok(Reply::AclsDeleted { deleted }) => deleted,
        other => {
            if let Err(e) = other {
                tracing::warn!("DeleteAcls: {e}");
            }
            let results = req
                .filters
                .iter()
                .map(|_| {
                    failed(
                        ResponseError::UnknownServerError,
                        "placement is unavailable",
                    )
                })
                .collect();
            return ready(ResponseKind::DeleteAcls(
                DeleteAclsResponse::default().with_filter_results(results),
            ));
        }
    };
    let mut deleted = deleted.into_iter();
    let results = filters
        .iter()
        .map(|f| match f {
            None => failed(ResponseError::InvalidRequest, "unknown code in the filter"),
            Some(_) => DeleteAclsFilterResult::default().with_matching_acls(
                deleted
                    .next()
                    .unwrap_or_default()
                    .iter()
                    .map(|b| {
                        DeleteAclsMatchingAcl::default()
                            .with_resource_type(b.resource_type.code())
                            .with_resource_name(text(&b.resource_name))
                            .with_pattern_type(b.pattern.code())
                            .with_principal(text(&b.principal))
                            .with_host(text(&b.host))
                            .with_operation(b.operation.code())
                            .with_permission_type(b.permission.code())
                    })
                    .collect(),
            ),
        })
        .collect();
    crate::security::refresh(&ctx.broker).await;
    ready(ResponseKind::DeleteAcls(
        DeleteAclsResponse::default().with_filter_results(results),
    ))
}
