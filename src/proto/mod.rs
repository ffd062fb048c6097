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
pub mod gateway;
pub mod json;

/// A relative expiry as admins write it (`1h`, `90d`), or `never`; used by hsctl and the
/// REST API to fill the admin messages' expiration timestamps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expiration(pub Option<std::time::Duration>);

impl std::str::FromStr for Expiration {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("never") || text == "0" {
            return Ok(Expiration(None));
        }
        humantime::parse_duration(text)
            .map(|d| Expiration(Some(d)))
            .map_err(|e| format!("{e} (expected a duration like 1h or 90d, or \"never\")"))
    }
}

impl Expiration {
    /// The absolute expiry, counted from now.
    pub fn to_timestamp(self) -> Option<prost_types::Timestamp> {
        let d = self.0?;
        let at = chrono::Duration::from_std(d)
            .ok()
            .and_then(|d| chrono::Utc::now().checked_add_signed(d))
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC);
        Some(prost_types::Timestamp {
            seconds: at.timestamp(),
            nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
        })
    }
}
