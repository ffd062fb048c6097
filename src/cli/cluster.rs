//! `hsctl cluster …`, `hsctl policy …` and `hsctl version`.

pub use crate::proto::json::{cluster_status as status_json, role_name};
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use super::output::{Output, Table, opt_cell, yes_no};
use super::{CliError, Client, Target, connect};
use crate::proto::admin as pb;

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Members, roles, leader and replication progress, as the answering member sees them.
    Status,
    /// Add a member as a learner; it catches up from the leader (then `cluster promote`).
    Add {
        id: u64,
        /// Its member-to-member address, HOST:PORT. (Its own id: the global `--address`
        /// would otherwise capture it.)
        #[arg(id = "member_address", value_name = "ADDRESS")]
        address: String,
        /// Its control URL for Tailscale clients.
        #[arg(value_name = "CONTROL_URL")]
        control_url_arg: Option<String>,
        #[arg(long, conflicts_with = "control_url_arg")]
        control_url: Option<String>,
    },
    /// Make a learner a voter.
    Promote { id: u64 },
    /// Remove a member.
    #[command(visible_alias = "rm")]
    Remove { id: u64 },
    /// Hand leadership to ID (or to any suitable voter).
    TransferLeader { id: Option<u64> },
    /// Move a member's clients elsewhere and take leadership away from it.
    Drain { id: u64 },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Print the ACL policy.
    Get,
    /// Replace the ACL policy with a file's contents (HuJSON). A policy the member
    /// refuses changes nothing; the error names the problem.
    Set {
        #[arg(short = 'f', long)]
        file: PathBuf,
    },
    /// Check a policy file against the cluster's tailnet without storing it.
    Check {
        #[arg(short = 'f', long)]
        file: PathBuf,
    },
    /// Every kept version of the policy (the last 100 accepted), oldest first.
    History,
    /// Make a kept version the running policy again (checked first; kept as a new version).
    Rollback {
        #[arg(value_name = "VERSION")]
        to: u64,
    },
}

pub fn status_table(s: &pb::ClusterStatusResponse) -> String {
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "ADDRESS",
        "CONTROL URL",
        "ROLE",
        "VOTER",
        "HEALTHY",
        "APPLIED",
        "MATCH",
        "VERSION",
        "CLIENTS",
    ]);
    for m in &s.members {
        t.row(vec![
            m.id.to_string(),
            m.name.clone(),
            m.address.clone(),
            m.control_url.clone(),
            role_name(m.role).to_string(),
            yes_no(m.voter),
            yes_no(m.healthy),
            opt_cell(&m.last_applied),
            opt_cell(&m.match_index),
            opt_cell(&m.version),
            opt_cell(&m.clients),
        ]);
    }
    let leader = s
        .leader
        .map_or_else(|| "none".to_string(), |l| l.to_string());
    format!(
        "leader: {leader}  term: {}  answered by: {}\n{}",
        s.term,
        s.member_id,
        t.render()
    )
}

fn status_output(s: &pb::ClusterStatusResponse) -> Output {
    Output::new(status_json(s), status_table(s))
}

pub async fn run(cmd: &ClusterCommand, client: &mut Client) -> Result<Output, CliError> {
    let status = match cmd {
        ClusterCommand::Status => {
            client
                .cluster_status(pb::ClusterStatusRequest { local: true })
                .await?
        }
        ClusterCommand::Add {
            id,
            address,
            control_url_arg,
            control_url,
        } => {
            let control_url = control_url
                .clone()
                .or_else(|| control_url_arg.clone())
                .unwrap_or_default();
            let request = pb::AddMemberRequest {
                id: *id,
                address: address.clone(),
                control_url,
            };
            client.add_member(request).await?
        }
        ClusterCommand::Promote { id } => {
            client
                .promote_member(pb::MemberIdRequest { id: *id })
                .await?
        }
        ClusterCommand::Remove { id } => {
            client
                .remove_member(pb::MemberIdRequest { id: *id })
                .await?
        }
        ClusterCommand::TransferLeader { id } => {
            client
                .transfer_leader(pb::TransferLeaderRequest { id: *id })
                .await?
        }
        ClusterCommand::Drain { id } => {
            client.drain_member(pb::MemberIdRequest { id: *id }).await?
        }
    };
    Ok(status_output(&status.into_inner()))
}

pub async fn run_policy(
    cmd: &PolicyCommand,
    text: Option<String>,
    client: &mut Client,
) -> Result<Output, CliError> {
    let policy = match cmd {
        PolicyCommand::Get => {
            client
                .get_policy(pb::GetPolicyRequest {
                    local: crate::cli::local_reads(),
                })
                .await?
                .into_inner()
                .policy
        }
        PolicyCommand::Set { .. } => {
            let policy = text.ok_or_else(|| CliError::other("the policy file was not read"))?;
            client.set_policy(pb::SetPolicyRequest { policy }).await?;
            return Ok(Output::new(json!({ "updated": true }), "Policy updated"));
        }
        PolicyCommand::History => {
            let versions = client
                .list_policy_versions(pb::GetPolicyRequest {
                    local: crate::cli::local_reads(),
                })
                .await?
                .into_inner()
                .versions;
            let mut t = Table::new(&["VERSION", "ACCEPTED", "CURRENT", "SIZE"]);
            for v in &versions {
                t.row(vec![
                    v.version.to_string(),
                    super::output::time_cell(&v.at),
                    yes_no(v.current),
                    format!("{} bytes", v.policy.len()),
                ]);
            }
            let json: Vec<serde_json::Value> = versions
                .iter()
                .map(|v| {
                    json!({
                        "version": v.version,
                        "at": crate::proto::json::time(&v.at),
                        "current": v.current,
                        "policy": v.policy,
                    })
                })
                .collect();
            return Ok(Output::new(serde_json::Value::Array(json), t.render()));
        }
        PolicyCommand::Rollback { to } => {
            client
                .rollback_policy(pb::RollbackPolicyRequest { version: *to })
                .await?;
            return Ok(Output::new(
                json!({ "rolled_back_to": to }),
                format!("Policy version {to} is running again"),
            ));
        }
        PolicyCommand::Check { .. } => {
            let policy = text.ok_or_else(|| CliError::other("the policy file was not read"))?;
            client.check_policy(pb::SetPolicyRequest { policy }).await?;
            return Ok(Output::new(json!({ "valid": true }), "Policy is valid"));
        }
    };
    Ok(Output::new(json!({ "policy": policy }), policy))
}

/// The client's version, and the answering member's when one answers within `timeout`
/// (an unreachable member is reported on stderr, not as a failure).
pub async fn version(target: &Target, timeout: Duration) -> Output {
    let client_version = env!("CARGO_PKG_VERSION");
    let server = tokio::time::timeout(timeout, async {
        let mut client = connect::connect(target, timeout).await?;
        let reply = client.version(pb::VersionRequest {}).await?.into_inner();
        Ok::<_, CliError>(reply)
    })
    .await;
    let server = match server {
        Ok(Ok(reply)) => Some(reply),
        Ok(Err(error)) => {
            eprintln!("hsctl: server version unknown: {}", error.message);
            None
        }
        Err(_) => {
            eprintln!(
                "hsctl: server version unknown: no answer within {}",
                humantime::format_duration(timeout)
            );
            None
        }
    };
    let mut table = format!("hsctl {client_version}");
    if let Some(reply) = &server {
        table.push_str(&format!(
            "\nhsd {} (member {})",
            reply.version, reply.member_id
        ));
    }
    let json = json!({
        "client": client_version,
        "server": server.as_ref().map(|r| r.version.clone()),
        "member_id": server.as_ref().map(|r| r.member_id),
    });
    Output::new(json, table)
}
