//! `tasklog token create|ls|revoke`, and where the CLI finds its own token.
//!
//! With a token (`TASKLOG_TOKEN`, or the one `tasklog up` keeps in the state
//! directory) the commands call the API, which needs an admin token. Without one, on
//! a host with the database and broker settings, `tasklog token create` is the
//! bootstrap: it does what the API would (credential, `token_created` on the log, wait
//! for the projector) directly, as the operator of this host.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::client::ApiClient;
use super::servers::{open_store, topics_for};
use super::{ApiArgs, DbArgs, KafkaArgs};
use crate::api::tokens::{IssuedToken, TokenDesk, TokenRequest};
use crate::consistency::Projections;
use crate::events::auth::Role;
use crate::kafka::{self, Appender, AppenderOptions};

/// Name of the file, in the state directory, holding the admin token `tasklog up`
/// made on its first start.
pub const TOKEN_FILE: &str = "admin.token";

/// How long an operator command waits for a projector to apply its change.
const OPERATOR_WAIT: Duration = Duration::from_secs(30);

/// `tasklog token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; prints it once (only a hash of it is kept).
    Create(CreateArgs),
    /// List tokens (names, roles, projects, expiry; never secrets).
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke a token: every API server refuses it within seconds.
    Revoke {
        /// The token's name.
        name: String,
        #[command(flatten)]
        via: Via,
    },
}

/// Where a token command goes: the API (with a token), or — `--direct`, or with no
/// token at hand — the database and broker of this host, as its operator.
#[derive(Debug, Args)]
pub struct Via {
    /// Act directly with the database and broker settings of this host (the
    /// bootstrap, or revoking the last admin token), even if a token is at hand.
    #[arg(long)]
    direct: bool,
    #[command(flatten)]
    api: ApiArgs,
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    db: DbArgs,
}

impl Via {
    /// The desk to act on directly, when the command does not go to the API.
    async fn direct_desk(&self) -> anyhow::Result<Option<TokenDesk>> {
        if self.direct || client_token(&self.api).is_none() {
            return Ok(Some(direct_desk(&self.kafka, &self.db).await?));
        }
        Ok(None)
    }
}

/// `tasklog token create`
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The token's name (a worker token's name is the id of the worker it acts as).
    #[arg(long)]
    name: String,
    /// admin, submitter, reader or worker.
    #[arg(long)]
    role: String,
    /// A project it reaches (repeatable; `*` for all). Default: all for admins,
    /// `default` for the others.
    #[arg(long = "project")]
    projects: Vec<String>,
    /// How long it lives, e.g. 90d or 12h (default: until revoked).
    #[arg(long)]
    expires: Option<String>,
    /// Print JSON (with the token) instead of the bare token.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    via: Via,
}

/// The state directory: `$TASKLOG_STATE_DIR`, `$XDG_STATE_HOME/tasklog` or
/// `~/.local/state/tasklog`.
pub fn state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TASKLOG_STATE_DIR") {
        return PathBuf::from(dir);
    }
    crate::worker::ledger::state_base().join("tasklog")
}

/// The token the CLI calls the API with: `TASKLOG_TOKEN` (or `--token`), else the one
/// `tasklog up` saved in the state directory.
pub fn client_token(args: &ApiArgs) -> Option<String> {
    if let Some(t) = args.token.as_deref().filter(|t| !t.is_empty()) {
        return Some(t.trim().to_string());
    }
    read_token_file(&state_dir().join(TOKEN_FILE))
}

fn read_token_file(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let token = text.trim();
    (!token.is_empty()).then(|| token.to_string())
}

/// Writes `token` to `path`, readable by its owner only (created with mode 0600).
pub fn write_token_file(path: &Path, token: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(file, "{token}").with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// This host's name (`localhost` when it has none to give).
fn host() -> String {
    hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// Who an operator command acts as: `operator:<user>@<host>`.
pub fn operator_principal() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    format!("operator:{user}@{}", host())
}

/// A token desk over the database and broker of this host (no API involved).
pub async fn direct_desk(kafka_args: &KafkaArgs, db: &DbArgs) -> anyhow::Result<TokenDesk> {
    let store = open_store(db).await?;
    let topics = topics_for(&kafka_args.topic_prefix)?;
    kafka::ensure_topics(&kafka_args.brokers, &topics.all(), kafka_args.partitions)
        .await
        .with_context(|| format!("no Kafka broker answers at {}", kafka_args.brokers))?;
    let appender = Appender::new(&AppenderOptions::new(&kafka_args.brokers))?;
    let projections = Projections::follow(store.clone(), &[crate::store::TOKENS_CHANNEL]);
    Ok(TokenDesk {
        store,
        appender,
        projections,
        topic: topics.auth.clone(),
        source: format!("tasklog://cli/{}", operator_principal()),
        wait: OPERATOR_WAIT,
    })
}

fn request(args: &CreateArgs) -> anyhow::Result<TokenRequest> {
    let role = Role::parse(&args.role).with_context(|| {
        format!(
            "--role {:?}: one of admin, submitter, reader, worker",
            args.role
        )
    })?;
    Ok(TokenRequest {
        name: args.name.clone(),
        role,
        projects: (!args.projects.is_empty()).then(|| args.projects.clone()),
        expires_in: args.expires.clone().map(Value::String),
    })
}

fn print_issued(issued: &Value, json_out: bool) {
    if json_out {
        println!("{issued}");
        return;
    }
    if let Some(token) = issued["token"].as_str() {
        println!("{token}");
    }
    eprintln!(
        "token {} ({}, projects {}{}) created; this is the only time it is shown",
        issued["name"],
        issued["role"].as_str().unwrap_or("?"),
        issued["projects"],
        issued["expires_at"]
            .as_str()
            .map(|e| format!(", expires {e}"))
            .unwrap_or_default(),
    );
}

/// Runs a `tasklog token` command.
pub async fn run(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create(args) => {
            let request = request(&args)?;
            if let Some(desk) = args.via.direct_desk().await? {
                let issued: IssuedToken = desk
                    .issue(&operator_principal(), &request)
                    .await
                    .map_err(|e| anyhow::anyhow!("{}: {}", e.code, e.message))?;
                print_issued(&json!(issued), args.json);
                return Ok(());
            }
            let client = ApiClient::new(&args.via.api)?;
            let body = json!({
                "name": request.name,
                "role": request.role,
                "projects": request.projects,
                "expires_in": request.expires_in,
            });
            let issued = client
                .call(client.http.post(client.url("/v1/tokens")).json(&body))
                .await?;
            print_issued(&issued, args.json);
            Ok(())
        }
        TokenCommand::Ls { json, api } => {
            let client = ApiClient::new(&api)?;
            let body = client
                .call(client.http.get(client.url("/v1/tokens")))
                .await?;
            let tokens = body["tokens"].as_array().cloned().unwrap_or_default();
            if json {
                for t in &tokens {
                    println!("{t}");
                }
                return Ok(());
            }
            println!(
                "{:<32} {:<10} {:<24} {:<26} STATUS",
                "NAME", "ROLE", "PROJECTS", "EXPIRES"
            );
            for t in tokens {
                let projects: Vec<&str> = t["projects"]
                    .as_array()
                    .map(|p| p.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let status = if t["revoked_at"].is_string() {
                    "revoked"
                } else {
                    "active"
                };
                println!(
                    "{:<32} {:<10} {:<24} {:<26} {status}",
                    t["name"].as_str().unwrap_or("?"),
                    t["role"].as_str().unwrap_or("?"),
                    projects.join(","),
                    t["expires_at"].as_str().unwrap_or("never"),
                );
            }
            Ok(())
        }
        TokenCommand::Revoke { name, via } => {
            let body = if let Some(desk) = via.direct_desk().await? {
                let state = desk
                    .revoke(&operator_principal(), &name)
                    .await
                    .map_err(|e| anyhow::anyhow!("{}: {}", e.code, e.message))?;
                json!(state)
            } else {
                let client = ApiClient::new(&via.api)?;
                let path = format!("/v1/tokens/{name}/revoke");
                client.call(client.http.post(client.url(&path))).await?
            };
            println!(
                "token {} revoked at {}",
                body["name"],
                body["revoked_at"].as_str().unwrap_or("?")
            );
            Ok(())
        }
    }
}

/// On `tasklog up`'s first start: an admin token in the state directory (mode 0600),
/// which the CLI on this machine then uses. Returns the token and where it is.
pub async fn ensure_local_admin(
    desk: &TokenDesk,
    dir: &Path,
) -> anyhow::Result<(String, PathBuf, bool)> {
    let path = dir.join(TOKEN_FILE);
    if let Some(token) = read_token_file(&path) {
        let hash = crate::events::auth::token_hash(&token);
        let now = chrono::Utc::now();
        let active = desk
            .store
            .credentials()
            .await?
            .iter()
            .any(|c| c.hash == hash && c.token.active_at(now));
        if active {
            return Ok((token, path, false));
        }
        // Revoked, expired, or from a log that is gone (the in-memory broker):
        // replaced by a new one.
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    let host: String = host()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
        .collect();
    let mut name = format!("admin@{host}");
    if desk
        .store
        .token(&name)
        .await?
        .is_some_and(|t| t.revoked_at.is_none())
    {
        // Its file was lost: a new name, so the old token (revoke it) is not reused.
        name = format!("{name}-{}", chrono::Utc::now().format("%Y%m%d%H%M%S"));
    }
    let request = TokenRequest {
        name,
        role: Role::Admin,
        projects: None,
        expires_in: None,
    };
    let issued = desk
        .issue(&operator_principal(), &request)
        .await
        .map_err(|e| {
            anyhow::anyhow!("creating the local admin token: {}: {}", e.code, e.message)
        })?;
    write_token_file(&path, &issued.token)?;
    Ok((issued.token, path, true))
}
