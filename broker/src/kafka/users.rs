//! DescribeUserScramCredentials and AlterUserScramCredentials: Kafka's
//! own API for the SCRAM users placement keeps.

use std::collections::{BTreeMap, BTreeSet};

use kafka_protocol::ResponseError;
use kafka_protocol::messages::alter_user_scram_credentials_response::AlterUserScramCredentialsResult;
use kafka_protocol::messages::describe_user_scram_credentials_response::{
    CredentialInfo, DescribeUserScramCredentialsResult,
};
use kafka_protocol::messages::{
    AlterUserScramCredentialsRequest, AlterUserScramCredentialsResponse,
    DescribeUserScramCredentialsRequest, DescribeUserScramCredentialsResponse, ResponseKind,
};
use kafka_protocol::protocol::StrBytes;
use shoal_placement::{Command, Reply};
use shoal_security::scram::{MAX_ITERATIONS, MIN_ITERATIONS, ScramCredential, ScramMechanism};

use super::conn::Ctx;
use super::{Pending, ready};

pub fn describe(ctx: &Ctx, req: DescribeUserScramCredentialsRequest) -> Pending {
    // Without an authorizer, user names are for authenticated clients
    // only (with one, authz.rs asks for DESCRIBE on the cluster).
    if ctx.broker.config.authorizer.is_none() && ctx.principal == super::auth::ANONYMOUS {
        return ready(ResponseKind::DescribeUserScramCredentials(
            DescribeUserScramCredentialsResponse::default()
                .with_error_code(ResponseError::ClusterAuthorizationFailed.code())
                .with_error_message(Some(StrBytes::from_static_str(
                    "only an authenticated client may list users",
                ))),
        ));
    }
    let security = ctx.broker.users.snapshot();
    // Null or empty: every user (librdkafka sends an empty list).
    let wanted: Vec<String> = match req.users {
        Some(list) if !list.is_empty() => list.iter().map(|u| u.name.to_string()).collect(),
        _ => security.users.keys().cloned().collect(),
    };
    let mut seen = BTreeMap::<&str, usize>::new();
    for w in &wanted {
        *seen.entry(w).or_default() += 1;
    }
    let mut results = Vec::new();
    let mut done = BTreeSet::new();
    for user in &wanted {
        if !done.insert(user.as_str()) {
            continue;
        }
        let result = DescribeUserScramCredentialsResult::default()
            .with_user(StrBytes::from_string(user.clone()));
        let result = if seen[user.as_str()] > 1 {
            result
                .with_error_code(ResponseError::DuplicateResource.code())
                .with_error_message(Some(StrBytes::from_static_str(
                    "the user is named more than once",
                )))
        } else {
            match security.users.get(user) {
                None => result
                    .with_error_code(ResponseError::ResourceNotFound.code())
                    .with_error_message(Some(StrBytes::from_static_str(
                        "the user has no SCRAM credential",
                    ))),
                Some(creds) => result.with_credential_infos(
                    creds
                        .iter()
                        .map(|(m, c)| {
                            CredentialInfo::default()
                                .with_mechanism(m.kafka_code())
                                .with_iterations(i32::try_from(c.iterations).unwrap_or(i32::MAX))
                        })
                        .collect(),
                ),
            }
        };
        results.push(result);
    }
    ready(ResponseKind::DescribeUserScramCredentials(
        DescribeUserScramCredentialsResponse::default().with_results(results),
    ))
}

/// One change asked for, checked.
enum Change {
    Put(ScramMechanism, ScramCredential),
    Delete(ScramMechanism),
}

pub async fn alter(ctx: &Ctx, req: AlterUserScramCredentialsRequest) -> Pending {
    // Without an authorizer no ACL says who may change whose password: a
    // client may change only its own (and an anonymous one, none). With
    // one, authz.rs asks for ALTER on the cluster.
    let own_only = ctx.broker.config.authorizer.is_none();
    if own_only && ctx.principal == super::auth::ANONYMOUS {
        return refuse_all(&req);
    }
    // user -> the changes asked for it, or the first reason to refuse them.
    let mut per_user: BTreeMap<String, Result<Vec<Change>, (ResponseError, &'static str)>> =
        BTreeMap::new();
    let mut pairs = BTreeSet::new();
    let deletions = req
        .deletions
        .iter()
        .map(|d| (d.name.to_string(), d.mechanism, None));
    let upsertions = req.upsertions.iter().map(|u| {
        (
            u.name.to_string(),
            u.mechanism,
            Some((u.iterations, &u.salt, &u.salted_password)),
        )
    });
    for (user, code, upsert) in deletions.chain(upsertions) {
        let entry = per_user
            .entry(user.clone())
            .or_insert_with(|| Ok(Vec::new()));
        let Ok(changes) = entry else { continue };
        if own_only && ctx.principal.strip_prefix("User:") != Some(user.as_str()) {
            *entry = Err((
                ResponseError::ClusterAuthorizationFailed,
                "without an authorizer a client may change only its own credentials",
            ));
            continue;
        }
        let checked = check(&user, code, upsert, &mut pairs);
        match checked {
            Ok(change) => changes.push(change),
            Err(e) => *entry = Err(e),
        }
    }
    let mut results = Vec::new();
    for (user, changes) in per_user {
        let outcome = match changes {
            Err(e) => Err(e),
            Ok(changes) => apply(ctx, &user, changes).await,
        };
        let result =
            AlterUserScramCredentialsResult::default().with_user(StrBytes::from_string(user));
        results.push(match outcome {
            Ok(()) => result,
            Err((code, msg)) => result
                .with_error_code(code.code())
                .with_error_message(Some(StrBytes::from_static_str(msg))),
        });
    }
    crate::security::refresh(&ctx.broker).await;
    ready(ResponseKind::AlterUserScramCredentials(
        AlterUserScramCredentialsResponse::default().with_results(results),
    ))
}

fn refuse_all(req: &AlterUserScramCredentialsRequest) -> Pending {
    let users: BTreeSet<&str> = req
        .deletions
        .iter()
        .map(|d| d.name.as_str())
        .chain(req.upsertions.iter().map(|u| u.name.as_str()))
        .collect();
    let results = users
        .into_iter()
        .map(|u| {
            AlterUserScramCredentialsResult::default()
                .with_user(StrBytes::from_string(u.to_string()))
                .with_error_code(ResponseError::ClusterAuthorizationFailed.code())
                .with_error_message(Some(StrBytes::from_static_str(
                    "only an authenticated client may change credentials",
                )))
        })
        .collect();
    ready(ResponseKind::AlterUserScramCredentials(
        AlterUserScramCredentialsResponse::default().with_results(results),
    ))
}

fn check(
    user: &str,
    code: i8,
    upsert: Option<(i32, &bytes::Bytes, &bytes::Bytes)>,
    pairs: &mut BTreeSet<(String, i8)>,
) -> Result<Change, (ResponseError, &'static str)> {
    if user.is_empty() {
        return Err((
            ResponseError::UnacceptableCredential,
            "the user name is empty",
        ));
    }
    if !pairs.insert((user.to_string(), code)) {
        return Err((
            ResponseError::DuplicateResource,
            "a user and mechanism appear more than once",
        ));
    }
    let Some(mechanism) = ScramMechanism::from_kafka_code(code) else {
        return Err((
            ResponseError::UnsupportedSaslMechanism,
            "unknown SCRAM mechanism",
        ));
    };
    let Some((iterations, salt, salted)) = upsert else {
        return Ok(Change::Delete(mechanism));
    };
    let iterations = u32::try_from(iterations)
        .ok()
        .filter(|i| (MIN_ITERATIONS..=MAX_ITERATIONS).contains(i))
        .ok_or((
            ResponseError::UnacceptableCredential,
            "iterations must be between 4096 and 16384",
        ))?;
    if salt.is_empty() || salted.is_empty() {
        return Err((
            ResponseError::UnacceptableCredential,
            "the salt and salted password must not be empty",
        ));
    }
    Ok(Change::Put(
        mechanism,
        ScramCredential::from_salted_password(mechanism, salted, salt.to_vec(), iterations),
    ))
}

async fn apply(
    ctx: &Ctx,
    user: &str,
    changes: Vec<Change>,
) -> Result<(), (ResponseError, &'static str)> {
    for change in changes {
        let cmd = match change {
            Change::Put(mechanism, credential) => Command::PutScramCredential {
                user: user.to_string(),
                mechanism,
                credential,
            },
            Change::Delete(mechanism) => Command::DeleteScramCredential {
                user: user.to_string(),
                mechanism,
            },
        };
        match ctx.broker.placement.write(cmd).await {
            Ok(Reply::Rejected {
                rejection: shoal_placement::Rejection::UnknownCredential { .. },
            }) => {
                return Err((
                    ResponseError::ResourceNotFound,
                    "the user has no credential for that mechanism",
                ));
            }
            Ok(Reply::Rejected { .. }) => {
                return Err((
                    ResponseError::UnacceptableCredential,
                    "placement refused the credential",
                ));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(user, "SCRAM credential change failed: {e}");
                return Err((
                    ResponseError::UnknownServerError,
                    "placement is unavailable",
                ));
            }
        }
    }
    Ok(())
}
