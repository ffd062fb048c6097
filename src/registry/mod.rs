//! The replicated domain: users, nodes, keys, pre-auth keys, API keys, DNS and policy.
//!
//! Pure and deterministic: no tokio, openraft, tonic, axum or rocksdb here. `raft` applies
//! `Command`s through `Registry::apply`; everything else reads an applied `Registry` view.

pub mod change;
pub mod command;
pub mod ipalloc;
pub mod names;
pub mod secrets;
pub mod state;
pub mod types;

pub use change::{Change, Record};
pub use command::{
    Command, ExpireUntil, NodeAuth, Outcome, Proposal, Rejection, Request, RequestId,
};
pub use state::{AUDIT_MAX, Applied, Registry, StoreError};
pub use types::*;
