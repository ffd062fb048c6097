//! hsd: a clustered, self-hosted Tailscale control server.
//!
//! Module map (see README.md "Architecture"):
//! - `config`    Config and its sections, defaults, validation, the embedded default.
//! - `registry`  the replicated domain: pure, no async, no disk.
//! - `raft`      openraft glue: rocksdb log store and state machine, network, Cluster handle.
//! - `control`   ts2021 (Noise), /machine/register, /machine/map streaming.
//! - `derp`      DERP relay, mesh between members, STUN.
//! - `admin`     gRPC admin API (unix socket and TCP with API keys).
//! - `cli`       hsctl.
//! - `policy`    the access-control engine: policy files to filters, peers, routes, SSH.
//! - `limit`     rate limits keyed by source, node or DERP key.
//! - `server`    builds, binds, spawns and shuts down everything.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod config;
pub mod control;
pub mod derp;
pub mod limit;
pub mod oidc;
pub mod policy;
pub mod presence;
pub mod proto;
pub mod raft;
pub mod registry;
pub mod server;
pub mod telemetry;
pub mod util;
