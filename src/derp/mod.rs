//! DERP relay (Designated Encrypted Relay for Packets), wire-compatible with Tailscale
//! clients (protocol version 2): the relay server, the STUN responder, the mesh links that
//! join cluster members into one region, and a small client used by the mesh and tests.

pub mod client;
pub mod frame;
pub mod mesh;
pub mod region;
pub mod server;
pub mod stun;

pub use client::DerpClient;
pub use server::DerpServer;
