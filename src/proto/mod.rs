//! Code generated from `proto/*.proto` by build.rs (tonic + prost), and JSON views of it.

/// The admin API that `hsctl` speaks.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod admin {
    tonic::include_proto!("hsd.admin.v1");
}

/// Member-to-member Raft RPC and write forwarding.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod raft {
    tonic::include_proto!("hsd.raft.v1");
}

/// JSON views of admin messages (hsctl output, REST API).
pub mod json;
