//! `hsctl preauthkeys …` and `hsctl apikeys …`.

pub use crate::proto::json::{api_key as api_key_json, preauth_key as preauth_key_json};
use clap::Subcommand;
use serde_json::Value;

use super::output::{Output, Table, time_cell, yes_no};
use super::{CliError, Client, Expiration, non_empty};
use crate::proto::admin as pb;

#[derive(Subcommand, Debug)]
pub enum PreAuthKeysCommand {
    /// Create a pre-auth key; the full key is shown only now.
    Create {
        #[arg(short = 'u', long)]
        user: String,
        /// Usable for any number of nodes.
        #[arg(long)]
        reusable: bool,
        /// Nodes joining with it are removed when they go away.
        #[arg(long)]
        ephemeral: bool,
        /// How long the key is valid (e.g. 1h, 90d), or "never".
        #[arg(short = 'e', long, default_value = "1h")]
        expiration: Expiration,
        /// Tags for nodes joining with it: tag:a,tag:b
        #[arg(long, value_delimiter = ',', num_args = 0..)]
        tags: Vec<String>,
    },
    /// List pre-auth keys.
    #[command(visible_alias = "ls")]
    List {
        /// Only this user's keys.
        #[arg(short = 'u', long)]
        user: Option<String>,
    },
    /// Expire a pre-auth key now.
    #[command(visible_alias = "revoke")]
    Expire {
        #[arg(short = 'u', long)]
        user: String,
        /// The full key or its prefix.
        key: String,
    },
    /// Delete a pre-auth key; nodes that joined with it stay.
    #[command(visible_aliases = ["del", "rm"])]
    Delete {
        #[arg(short = 'u', long)]
        user: String,
        /// The full key or its prefix.
        key: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ApiKeysCommand {
    /// Create an API key; the full key is shown only now.
    Create {
        /// How long the key is valid (e.g. 90d), or "never".
        #[arg(short = 'e', long, default_value = "90d")]
        expiration: Expiration,
    },
    /// List API keys.
    #[command(visible_alias = "ls")]
    List,
    /// Expire an API key now.
    #[command(visible_alias = "revoke")]
    Expire {
        /// The prefix (or the full key).
        prefix: String,
    },
    /// Delete an API key.
    #[command(visible_aliases = ["destroy", "rm"])]
    Delete {
        /// The prefix (or the full key).
        prefix: String,
    },
}

pub fn preauth_keys_table(keys: &[pb::PreAuthKey]) -> String {
    let mut t = Table::new(&[
        "ID",
        "PREFIX",
        "USER",
        "REUSABLE",
        "EPHEMERAL",
        "USED",
        "EXPIRATION",
        "EXPIRED",
        "TAGS",
    ]);
    for k in keys {
        t.row(vec![
            k.id.to_string(),
            k.prefix.clone(),
            k.user.clone(),
            yes_no(k.reusable),
            yes_no(k.ephemeral),
            yes_no(k.used),
            time_cell(&k.expiration),
            yes_no(k.expired),
            k.tags.join(","),
        ]);
    }
    t.render()
}

pub fn api_keys_table(keys: &[pb::ApiKey]) -> String {
    let mut t = Table::new(&["ID", "PREFIX", "EXPIRATION", "EXPIRED", "CREATED"]);
    for k in keys {
        t.row(vec![
            k.id.to_string(),
            k.prefix.clone(),
            time_cell(&k.expiration),
            yes_no(k.expired),
            time_cell(&k.created_at),
        ]);
    }
    t.render()
}

fn missing(what: &str) -> CliError {
    CliError::other(format!("the member answered without {what}"))
}

pub async fn run_preauthkeys(
    cmd: &PreAuthKeysCommand,
    client: &mut Client,
) -> Result<Output, CliError> {
    match cmd {
        PreAuthKeysCommand::Create {
            user,
            reusable,
            ephemeral,
            expiration,
            tags,
        } => {
            let request = pb::CreatePreAuthKeyRequest {
                user: user.clone(),
                reusable: *reusable,
                ephemeral: *ephemeral,
                expiration: expiration.to_timestamp(),
                tags: non_empty(tags),
            };
            let key = client
                .create_pre_auth_key(request)
                .await?
                .into_inner()
                .pre_auth_key
                .ok_or_else(|| missing("a key"))?;
            // Table mode prints only the key, so `KEY=$(hsctl preauthkeys create …)` works.
            let text = key.key.clone().unwrap_or_default();
            Ok(Output::new(preauth_key_json(&key), text))
        }
        PreAuthKeysCommand::List { user } => {
            let request = pb::ListPreAuthKeysRequest {
                local: crate::cli::local_reads(),
                user: user.clone().unwrap_or_default(),
            };
            let keys = client
                .list_pre_auth_keys(request)
                .await?
                .into_inner()
                .pre_auth_keys;
            Ok(Output::new(
                Value::Array(keys.iter().map(preauth_key_json).collect()),
                preauth_keys_table(&keys),
            ))
        }
        PreAuthKeysCommand::Expire { user, key } => {
            let request = pb::ExpirePreAuthKeyRequest {
                user: user.clone(),
                key: key.clone(),
            };
            let key = client
                .expire_pre_auth_key(request)
                .await?
                .into_inner()
                .pre_auth_key
                .ok_or_else(|| missing("a key"))?;
            let text = format!("Expired pre-auth key {}", key.prefix);
            Ok(Output::new(preauth_key_json(&key), text))
        }
        PreAuthKeysCommand::Delete { user, key } => {
            let request = pb::ExpirePreAuthKeyRequest {
                user: user.clone(),
                key: key.clone(),
            };
            let key = client
                .delete_pre_auth_key(request)
                .await?
                .into_inner()
                .pre_auth_key
                .ok_or_else(|| missing("a key"))?;
            let text = format!("Deleted pre-auth key {}", key.prefix);
            Ok(Output::new(preauth_key_json(&key), text))
        }
    }
}

pub async fn run_apikeys(cmd: &ApiKeysCommand, client: &mut Client) -> Result<Output, CliError> {
    match cmd {
        ApiKeysCommand::Create { expiration } => {
            let request = pb::CreateApiKeyRequest {
                expiration: expiration.to_timestamp(),
            };
            let key = client
                .create_api_key(request)
                .await?
                .into_inner()
                .api_key
                .ok_or_else(|| missing("a key"))?;
            let text = key.key.clone().unwrap_or_default();
            Ok(Output::new(api_key_json(&key), text))
        }
        ApiKeysCommand::List => {
            let keys = client
                .list_api_keys(pb::ListApiKeysRequest {
                    local: crate::cli::local_reads(),
                })
                .await?
                .into_inner()
                .api_keys;
            Ok(Output::new(
                Value::Array(keys.iter().map(api_key_json).collect()),
                api_keys_table(&keys),
            ))
        }
        ApiKeysCommand::Expire { prefix } => {
            let request = pb::ApiKeyPrefixRequest {
                prefix: prefix.clone(),
            };
            let key = client
                .expire_api_key(request)
                .await?
                .into_inner()
                .api_key
                .ok_or_else(|| missing("a key"))?;
            let text = format!("Expired API key {}", key.prefix);
            Ok(Output::new(api_key_json(&key), text))
        }
        ApiKeysCommand::Delete { prefix } => {
            let request = pb::ApiKeyPrefixRequest {
                prefix: prefix.clone(),
            };
            let key = client
                .delete_api_key(request)
                .await?
                .into_inner()
                .api_key
                .ok_or_else(|| missing("a key"))?;
            let text = format!("Deleted API key {}", key.prefix);
            Ok(Output::new(api_key_json(&key), text))
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Admin actions and refused admin authentications, oldest first.
    List {
        /// Only records since this long ago (`1h`, `7d`) or this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only this actor (`uid:1000`, `apikey:<prefix>`).
        #[arg(long)]
        actor: Option<String>,
    },
}

pub async fn run_audit(cmd: &AuditCommand, client: &mut Client) -> Result<Output, CliError> {
    let AuditCommand::List { since, actor } = cmd;
    let since = since.as_deref().map(parse_since).transpose()?;
    let records = client
        .list_audit(pb::ListAuditRequest {
            since,
            actor: actor.clone().unwrap_or_default(),
            local: crate::cli::local_reads(),
        })
        .await?
        .into_inner()
        .records;
    let mut table = Table::new(&["TIME", "ACTOR", "ACTION", "TARGET", "RESULT"]);
    for r in &records {
        table.row(vec![
            time_cell(&r.time),
            r.actor.clone(),
            r.action.clone(),
            r.target.clone(),
            r.result.clone(),
        ]);
    }
    Ok(Output::new(
        Value::Array(
            records
                .iter()
                .map(crate::proto::json::audit_record)
                .collect(),
        ),
        table.render(),
    ))
}

/// `--since`: a duration back from now, or an RFC 3339 time.
fn parse_since(text: &str) -> Result<prost_types::Timestamp, CliError> {
    let at = match humantime::parse_duration(text) {
        Ok(ago) => std::time::SystemTime::now() - ago,
        Err(_) => humantime::parse_rfc3339_weak(text).map_err(|_| {
            CliError::usage(format!(
                "--since {text:?}: give a duration such as 1h or an RFC 3339 time"
            ))
        })?,
    };
    Ok(prost_types::Timestamp::from(at))
}
