//! Code generated from `proto/*.proto` by build.rs (tonic + prost).

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// The admin API that `hsctl` speaks.
pub mod admin {
    tonic::include_proto!("hsd.admin.v1");
}

/// Member-to-member Raft RPC and write forwarding.
pub mod raft {
    tonic::include_proto!("hsd.raft.v1");
}
