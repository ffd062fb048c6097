//! Fault injection for tests, compiled only with the `fault-injection` feature (never in
//! release builds). Each hook is driven by a file a test writes, named by an environment
//! variable, so a running member can be steered from outside.

#[cfg(feature = "fault-injection")]
mod hooks {
    use std::path::PathBuf;
    use std::sync::OnceLock;

    /// A file listing member addresses (one per line) whose calls fail as if the network
    /// dropped them: partitions.
    const BLOCKLIST: &str = "HSD_FAULT_PEER_BLOCKLIST";
    /// A file whose existence makes the leader drop the reply to the next forwarded call
    /// after doing its work (the file is removed): a reply lost on the way back.
    const LOSE_REPLY: &str = "HSD_FAULT_LOSE_FORWARD_REPLY";
    /// A file whose existence makes this member hold every presence answer longer than
    /// the caller waits for it: a member alive but too busy to answer in time.
    const SLOW_PRESENCE: &str = "HSD_FAULT_SLOW_PRESENCE";
    /// How long a held presence answer waits (the caller gives up after 12 s).
    const PRESENCE_HOLD: std::time::Duration = std::time::Duration::from_secs(15);

    fn path(
        var: &'static str,
        cell: &'static OnceLock<Option<PathBuf>>,
    ) -> Option<&'static PathBuf> {
        cell.get_or_init(|| std::env::var_os(var).map(PathBuf::from))
            .as_ref()
    }

    pub fn blocked(addr: &str) -> bool {
        static FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
        path(BLOCKLIST, &FILE).is_some_and(|file| {
            std::fs::read_to_string(file).is_ok_and(|list| list.lines().any(|l| l.trim() == addr))
        })
    }

    pub fn lose_forward_reply() -> bool {
        static FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
        path(LOSE_REPLY, &FILE).is_some_and(|file| std::fs::remove_file(file).is_ok())
    }

    pub async fn hold_presence_answer() {
        static FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
        if path(SLOW_PRESENCE, &FILE).is_some_and(|file| file.exists()) {
            tokio::time::sleep(PRESENCE_HOLD).await;
        }
    }
}

#[cfg(not(feature = "fault-injection"))]
mod hooks {
    pub fn blocked(_addr: &str) -> bool {
        false
    }

    pub fn lose_forward_reply() -> bool {
        false
    }

    pub async fn hold_presence_answer() {}
}

pub use hooks::{blocked, hold_presence_answer, lose_forward_reply};
