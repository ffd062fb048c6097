//! Integration tests: real `hsd` members, real `hsctl`, real Tailscale clients, all inside
//! the loopback-only network namespace made by `tests/run.sh`.

mod harness;

mod cli;
mod clients;
mod cluster;
mod console;
mod control_tls;
mod durability;
mod faults;
mod history;
mod history_scale;
mod oidc;
mod policy;
mod protocol;
mod rest;
mod scripts;
mod security;
