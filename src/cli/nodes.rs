//! `hsctl nodes …` and its alias `hsctl auth register`.

pub use crate::proto::json::node as node_json;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::output::{Output, Table, opt_cell, time_cell, yes_no};
use super::{CliError, Client, non_empty};
use crate::proto::admin as pb;

#[derive(Subcommand, Debug)]
pub enum NodesCommand {
    /// List nodes.
    #[command(visible_alias = "ls")]
    List {
        /// Only this user's nodes.
        #[arg(short = 'u', long)]
        user: Option<String>,
    },
    /// Complete an interactive registration (the key from the client's AuthURL).
    Register(RegisterArgs),
    /// Let a node that waits for approval into the tailnet.
    Approve { id: u64 },
    /// Expire a node's key now; the client must log in again.
    #[command(visible_alias = "logout")]
    Expire { id: u64 },
    /// Set a node's name in the tailnet (its MagicDNS label).
    Rename { id: u64, new_name: String },
    /// Delete a node.
    #[command(visible_aliases = ["destroy", "rm"])]
    Delete {
        id: u64,
        /// Accepted for headscale compatibility; hsctl never asks.
        #[arg(long, hide = true)]
        force: bool,
    },
    /// Move a node to another user.
    Move {
        id: u64,
        #[arg(short = 'u', long)]
        user: String,
    },
    /// Routes: advertised by the client, approved (by an admin or the policy's
    /// autoApprovers), and primary (the router peers use now).
    ListRoutes {
        /// Only this node.
        id: Option<u64>,
    },
    /// Replace a node's approved routes (none given: approve none). Approving one exit
    /// route (0.0.0.0/0 or ::/0) approves both.
    ApproveRoutes {
        id: u64,
        /// 10.0.0.0/24,0.0.0.0/0
        #[arg(short = 'r', long, value_delimiter = ',', num_args = 0..)]
        routes: Vec<String>,
    },
    /// Replace a node's tags (none given: clear them).
    Tag {
        id: u64,
        /// tag:a,tag:b
        #[arg(short = 't', long, value_delimiter = ',', num_args = 0..)]
        tags: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuthCommand {
    /// Same as `nodes register`.
    Register(RegisterArgs),
}

#[derive(Args, Debug)]
pub struct RegisterArgs {
    /// The user who will own the node.
    #[arg(short = 'u', long)]
    pub user: String,
    /// The registration key from the client's AuthURL (or the URL itself).
    #[arg(short = 'k', long, alias = "auth-id")]
    pub key: String,
}

pub fn nodes_table(nodes: &[pb::Node]) -> String {
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "GIVEN NAME",
        "USER",
        "IP ADDRESSES",
        "ONLINE",
        "MEMBER",
        "APPROVED",
        "LAST SEEN",
        "EXPIRY",
        "TAGS",
    ]);
    for n in nodes {
        let expiry = if n.expired {
            format!("expired {}", time_cell(&n.expiry))
        } else {
            time_cell(&n.expiry)
        };
        t.row(vec![
            n.id.to_string(),
            n.name.clone(),
            n.given_name.clone(),
            n.user.clone(),
            n.ip_addresses.join(", "),
            yes_no(n.online),
            opt_cell(&n.member),
            yes_no(n.approved),
            time_cell(&n.last_seen),
            expiry,
            n.tags.join(","),
        ]);
    }
    t.render()
}

pub fn routes_table(nodes: &[pb::Node]) -> String {
    let mut t = Table::new(&["ID", "NAME", "ADVERTISED", "APPROVED", "PRIMARY"]);
    for n in nodes {
        t.row(vec![
            n.id.to_string(),
            n.given_name.clone(),
            n.advertised_routes.join(", "),
            n.approved_routes.join(", "),
            n.primary_routes.join(", "),
        ]);
    }
    t.render()
}

fn routes_json(n: &pb::Node) -> Value {
    json!({
        "id": n.id,
        "name": n.given_name,
        "advertised_routes": n.advertised_routes,
        "approved_routes": n.approved_routes,
        "primary_routes": n.primary_routes,
    })
}

fn one_node(response: pb::NodeResponse) -> Result<Output, CliError> {
    let node = response
        .node
        .ok_or_else(|| CliError::other("the member answered without a node"))?;
    Ok(Output::new(
        node_json(&node),
        nodes_table(std::slice::from_ref(&node)),
    ))
}

pub async fn register(args: &RegisterArgs, client: &mut Client) -> Result<Output, CliError> {
    let request = pb::RegisterNodeRequest {
        user: args.user.clone(),
        key: args.key.clone(),
    };
    one_node(client.register_node(request).await?.into_inner())
}

pub async fn run(cmd: &NodesCommand, client: &mut Client) -> Result<Output, CliError> {
    match cmd {
        NodesCommand::List { user } => {
            let request = pb::ListNodesRequest {
                local: crate::cli::local_reads(),
                user: user.clone().unwrap_or_default(),
            };
            let nodes = client.list_nodes(request).await?.into_inner().nodes;
            Ok(Output::new(
                Value::Array(nodes.iter().map(node_json).collect()),
                nodes_table(&nodes),
            ))
        }
        NodesCommand::Register(args) => register(args, client).await,
        NodesCommand::Approve { id } => one_node(
            client
                .approve_node(pb::NodeIdRequest { id: *id })
                .await?
                .into_inner(),
        ),
        NodesCommand::Expire { id } => one_node(
            client
                .expire_node(pb::ExpireNodeRequest {
                    id: *id,
                    ..Default::default()
                })
                .await?
                .into_inner(),
        ),
        NodesCommand::Rename { id, new_name } => {
            let request = pb::RenameNodeRequest {
                id: *id,
                new_name: new_name.clone(),
            };
            one_node(client.rename_node(request).await?.into_inner())
        }
        NodesCommand::Delete { id, force: _ } => {
            let deleted = client
                .delete_node(pb::NodeIdRequest { id: *id })
                .await?
                .into_inner();
            Ok(Output::new(
                json!({ "id": deleted.id }),
                format!("Node {} deleted", deleted.id),
            ))
        }
        NodesCommand::Move { id, user } => {
            let request = pb::MoveNodeRequest {
                id: *id,
                user: user.clone(),
            };
            one_node(client.move_node(request).await?.into_inner())
        }
        NodesCommand::ListRoutes { id } => {
            let nodes: Vec<pb::Node> = match id {
                Some(id) => {
                    let request = pb::GetNodeRequest {
                        id: *id,
                        local: crate::cli::local_reads(),
                    };
                    client
                        .get_node(request)
                        .await?
                        .into_inner()
                        .node
                        .into_iter()
                        .collect()
                }
                None => {
                    let request = pb::ListNodesRequest {
                        local: crate::cli::local_reads(),
                        user: String::new(),
                    };
                    let nodes = client.list_nodes(request).await?.into_inner().nodes;
                    let routes = |n: &pb::Node| {
                        !n.advertised_routes.is_empty() || !n.approved_routes.is_empty()
                    };
                    nodes.into_iter().filter(routes).collect()
                }
            };
            Ok(Output::new(
                Value::Array(nodes.iter().map(routes_json).collect()),
                routes_table(&nodes),
            ))
        }
        NodesCommand::ApproveRoutes { id, routes } => {
            let request = pb::ApproveRoutesRequest {
                id: *id,
                routes: non_empty(routes),
            };
            let node = client.approve_routes(request).await?.into_inner().node;
            let nodes: Vec<pb::Node> = node.into_iter().collect();
            Ok(Output::new(
                nodes.first().map(routes_json).unwrap_or(Value::Null),
                routes_table(&nodes),
            ))
        }
        NodesCommand::Tag { id, tags } => {
            let request = pb::SetTagsRequest {
                id: *id,
                tags: non_empty(tags),
            };
            one_node(client.set_tags(request).await?.into_inner())
        }
    }
}
