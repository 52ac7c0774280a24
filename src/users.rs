//! `shoal users add|list|delete`: SCRAM users in placement, either through
//! a running node's HTTP API (`--server`, with the operator's token from
//! SHOAL_TOKEN) or straight into a stopped standalone node's data dir, so
//! the first super user exists before the first start.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use shoal_placement::{
    Command, NodeConfig, PlacementClient, PlacementNode, Query, QueryReply, Reply,
};
use shoal_security::ClientAuth;
use shoal_security::scram::{MIN_ITERATIONS, ScramCredential, ScramMechanism};

#[derive(Debug, Args)]
pub struct Target {
    /// A running node's HTTP address (http://host:port, or https:// with
    /// the CA to trust in SHOAL_TLS_CA if it is not a public one).
    #[arg(long, env = "SHOAL_SERVER", conflicts_with = "data_dir")]
    server: Option<String>,
    /// The data dir of a stopped standalone node.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum UsersCmd {
    /// Add a user, or set a new password (one credential per mechanism).
    Add {
        name: String,
        #[arg(long, default_value = "SCRAM-SHA-512")]
        mechanism: String,
        /// Read the password from the first line of standard input.
        #[arg(long, required = true)]
        password_stdin: bool,
        #[arg(long, default_value_t = MIN_ITERATIONS)]
        iterations: u32,
        #[command(flatten)]
        target: Target,
    },
    /// Users and their mechanisms (never a credential).
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Remove a user's credential for one mechanism, or all of them.
    Delete {
        name: String,
        #[arg(long)]
        mechanism: Option<String>,
        #[command(flatten)]
        target: Target,
    },
}

pub async fn command(cmd: UsersCmd) -> Result<(), String> {
    match cmd {
        UsersCmd::Add {
            name,
            mechanism,
            password_stdin: _,
            iterations,
            target,
        } => {
            let mechanism = mechanism_arg(&mechanism)?;
            let mut password = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut password)
                .map_err(|e| format!("reading the password: {e}"))?;
            let password = password.trim_end_matches(['\n', '\r']);
            if password.is_empty() {
                return Err("the password is empty".into());
            }
            let credential = ScramCredential::new(mechanism, password, iterations);
            with_placement(&target, |client| async move {
                write(
                    &client,
                    Command::PutScramCredential {
                        user: name.clone(),
                        mechanism,
                        credential,
                    },
                )
                .await?;
                eprintln!("user {name}: {} credential set", mechanism.name());
                Ok(())
            })
            .await
        }
        UsersCmd::List { target } => {
            with_placement(&target, |client| async move {
                for (user, creds) in users(&client).await? {
                    let mechs: Vec<&str> = creds.keys().map(|m| m.name()).collect();
                    println!("{user}\t{}", mechs.join(","));
                }
                Ok(())
            })
            .await
        }
        UsersCmd::Delete {
            name,
            mechanism,
            target,
        } => {
            let only = mechanism.as_deref().map(mechanism_arg).transpose()?;
            with_placement(&target, |client| async move {
                let have: Vec<ScramMechanism> = users(&client)
                    .await?
                    .get(&name)
                    .map(|c| c.keys().copied().collect())
                    .unwrap_or_default();
                let gone: Vec<ScramMechanism> = have
                    .into_iter()
                    .filter(|m| only.is_none_or(|o| o == *m))
                    .collect();
                if gone.is_empty() {
                    return Err(format!("user {name} has no such credential"));
                }
                for mechanism in gone {
                    write(
                        &client,
                        Command::DeleteScramCredential {
                            user: name.clone(),
                            mechanism,
                        },
                    )
                    .await?;
                }
                Ok(())
            })
            .await
        }
    }
}

fn mechanism_arg(s: &str) -> Result<ScramMechanism, String> {
    ScramMechanism::parse(s)
        .ok_or_else(|| format!("unknown mechanism {s:?}: expected SCRAM-SHA-512 or SCRAM-SHA-256"))
}

async fn write(client: &PlacementClient, cmd: Command) -> Result<(), String> {
    match client.write(cmd).await.map_err(|e| e.to_string())? {
        Reply::Rejected { rejection } => Err(rejection.to_string()),
        _ => Ok(()),
    }
}

/// user -> mechanism -> iterations (no key material: an operator's token
/// may not read that).
async fn users(
    client: &PlacementClient,
) -> Result<BTreeMap<String, BTreeMap<ScramMechanism, u32>>, String> {
    match client
        .query(Query::Users)
        .await
        .map_err(|e| e.to_string())?
    {
        QueryReply::Users { users } => Ok(users),
        _ => Err("unexpected placement answer to a users query".into()),
    }
}

/// Runs `f` against the server, or against the stopped node's placement
/// opened here (and closed after).
async fn with_placement<F, Fut>(target: &Target, f: F) -> Result<(), String>
where
    F: FnOnce(PlacementClient) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    match (&target.server, &target.data_dir) {
        (Some(url), None) => {
            let mut auth = ClientAuth::from_token_env().map_err(|e| e.to_string())?;
            if url.starts_with("https://") {
                let ca = std::env::var_os("SHOAL_TLS_CA").map(PathBuf::from);
                auth = auth.with_https(ca.as_deref()).map_err(|e| e.to_string())?;
            }
            let addr = url
                .trim_start_matches("http://")
                .trim_start_matches("https://")
                .trim_end_matches('/')
                .to_string();
            f(PlacementClient::remote(vec![addr], &auth)).await
        }
        (None, Some(dir)) => {
            let placement_dir = dir.join("placement");
            if !placement_dir.exists() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot use data dir {}: {e}", dir.display()))?;
            }
            let node = PlacementNode::start(NodeConfig::standalone(
                1,
                placement_dir,
                "127.0.0.1:0",
            ))
            .await
            .map_err(|e| {
                format!(
                    "cannot open placement in {} (is the node running? then use --server): {e}",
                    dir.display()
                )
            })?;
            let result = f(PlacementClient::local(node.clone())).await;
            node.shutdown().await.map_err(|e| e.to_string())?;
            result
        }
        _ => Err("give --server URL (a running node) or --data-dir DIR (a stopped one)".into()),
    }
}
