//! `shoal tokens create|list|revoke`: operators' bearer tokens in the file
//! a server reads with `--admin-token-file` (it notices changes within a
//! second).

use std::path::PathBuf;

use clap::Subcommand;
use shoal_security::TokenFile;

#[derive(Debug, Subcommand)]
pub enum TokensCmd {
    /// Print a new token and append its SHA-256 to the file.
    Create {
        /// The token file (created with mode 0600 if missing).
        #[arg(long, env = "SHOAL_ADMIN_TOKEN_FILE")]
        file: PathBuf,
    },
    /// The id of every token in the file (tokens themselves are not kept).
    List {
        #[arg(long, env = "SHOAL_ADMIN_TOKEN_FILE")]
        file: PathBuf,
    },
    /// Remove the token(s) whose id starts with ID.
    Revoke {
        #[arg(long, env = "SHOAL_ADMIN_TOKEN_FILE")]
        file: PathBuf,
        id: String,
    },
}

pub fn command(cmd: TokensCmd) -> Result<(), String> {
    match cmd {
        TokensCmd::Create { file } => {
            let token = TokenFile::create(&file).map_err(|e| e.to_string())?;
            println!("{token}");
            eprintln!(
                "appended its hash to {}; the token is shown only now",
                file.display()
            );
        }
        TokensCmd::List { file } => {
            for id in TokenFile::ids(&file).map_err(|e| e.to_string())? {
                println!("{id}");
            }
        }
        TokensCmd::Revoke { file, id } => match TokenFile::revoke(&file, &id) {
            Ok(0) => return Err(format!("no token with id {id} in {}", file.display())),
            Ok(n) => eprintln!("revoked {n} token(s)"),
            Err(e) => return Err(e.to_string()),
        },
    }
    Ok(())
}
