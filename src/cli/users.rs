//! `hsctl users …`

pub use crate::proto::json::user as user_json;
use clap::Subcommand;
use serde_json::Value;

use super::output::{Output, Table, time_cell};
use super::{CliError, Client};
use crate::proto::admin as pb;

#[derive(Subcommand, Debug)]
pub enum UsersCommand {
    /// Create a user.
    Create {
        name: String,
        /// Shown instead of the name where set.
        #[arg(long, short = 'd')]
        display_name: Option<String>,
        /// The user's email, which policies may name instead of `name@`.
        #[arg(long, short = 'e')]
        email: Option<String>,
    },
    /// List users.
    #[command(visible_alias = "ls")]
    List {
        /// Only this user.
        #[arg(long)]
        name: Option<String>,
    },
    /// Rename a user.
    Rename { old: String, new: String },
    /// Delete a user (refused while it owns nodes); deletes its pre-auth keys.
    #[command(visible_aliases = ["destroy", "rm"])]
    Delete {
        name: String,
        /// Accepted for headscale compatibility; hsctl never asks.
        #[arg(long, hide = true)]
        force: bool,
    },
}

pub fn users_table(users: &[pb::User]) -> String {
    let mut t = Table::new(&["ID", "NAME", "EMAIL", "PROVIDER", "CREATED"]);
    for u in users {
        t.row(vec![
            u.id.to_string(),
            u.name.clone(),
            u.email.clone(),
            u.provider.clone(),
            time_cell(&u.created_at),
        ]);
    }
    t.render()
}

fn one(user: Option<pb::User>) -> Result<pb::User, CliError> {
    user.ok_or_else(|| CliError::other("the member answered without a user"))
}

pub async fn run(cmd: &UsersCommand, client: &mut Client) -> Result<Output, CliError> {
    match cmd {
        UsersCommand::Create {
            name,
            display_name,
            email,
        } => {
            let request = pb::CreateUserRequest {
                name: name.clone(),
                display_name: display_name.clone().unwrap_or_default(),
                email: email.clone().unwrap_or_default(),
            };
            let user = one(client.create_user(request).await?.into_inner().user)?;
            Ok(Output::new(
                user_json(&user),
                users_table(std::slice::from_ref(&user)),
            ))
        }
        UsersCommand::List { name } => {
            let request = pb::ListUsersRequest {
                local: crate::cli::local_reads(),
                name: name.clone().unwrap_or_default(),
            };
            let users = client.list_users(request).await?.into_inner().users;
            Ok(Output::new(
                Value::Array(users.iter().map(user_json).collect()),
                users_table(&users),
            ))
        }
        UsersCommand::Rename { old, new } => {
            let request = pb::RenameUserRequest {
                old_name: old.clone(),
                new_name: new.clone(),
            };
            let user = one(client.rename_user(request).await?.into_inner().user)?;
            Ok(Output::new(
                user_json(&user),
                users_table(std::slice::from_ref(&user)),
            ))
        }
        UsersCommand::Delete { name, force: _ } => {
            let user = one(client
                .delete_user(pb::DeleteUserRequest { name: name.clone() })
                .await?
                .into_inner()
                .user)?;
            Ok(Output::new(
                user_json(&user),
                format!("User {} deleted", user.name),
            ))
        }
    }
}
