//! hsctl, the admin CLI: a clap command tree (one file per noun), the connection to a
//! member, and table/JSON/YAML output. Uses only `proto` (and speaks gRPC); nothing
//! server-side.
//!
//! Exit codes: 0 ok, 64 usage error, 69 no member reachable (or gRPC `UNAVAILABLE`, or the
//! deadline passed), 77 refused credentials, 1 anything else (the message names it).

pub mod cluster;
pub mod connect;
pub mod keys;
pub mod nodes;
pub mod output;
pub mod users;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

pub use connect::{Client, Target};
pub use output::{Format, Output};

/// Default unix socket: the default data dir of a member started in the same directory.
pub const DEFAULT_SOCKET: &str = "./hsd-data/hsd.sock";

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILURE: u8 = 1;
/// EX_USAGE.
pub const EXIT_USAGE: u8 = 64;
/// EX_UNAVAILABLE.
pub const EXIT_UNAVAILABLE: u8 = 69;
/// EX_NOPERM.
pub const EXIT_NOPERM: u8 = 77;

#[derive(Parser, Debug)]
#[command(
    name = "hsctl",
    version,
    about = "Administer an hsd cluster",
    propagate_version = true
)]
pub struct Cli {
    /// The member's admin unix socket.
    #[arg(long, env = "HSCTL_SOCKET", global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// A member's admin gRPC address (TCP, needs --api-key); overrides --socket.
    #[arg(long, env = "HSCTL_ADDRESS", global = true, value_name = "HOST:PORT")]
    pub address: Option<String>,
    /// API key for --address.
    #[arg(
        long,
        env = "HSCTL_API_KEY",
        global = true,
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,
    /// Deadline for connecting and for the request.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// Answer reads from the member's own applied state, without confirming with the
    /// leader (faster, works without quorum, may be slightly stale).
    #[arg(long, global = true)]
    pub local: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Manage users.
    #[command(subcommand, visible_alias = "user")]
    Users(users::UsersCommand),
    /// Manage pre-auth keys.
    #[command(subcommand, visible_alias = "preauthkey")]
    Preauthkeys(keys::PreAuthKeysCommand),
    /// Manage nodes (Tailscale devices).
    #[command(subcommand, visible_alias = "node")]
    Nodes(nodes::NodesCommand),
    /// Interactive registration (`auth register` = `nodes register`).
    #[command(subcommand)]
    Auth(nodes::AuthCommand),
    /// Manage API keys for the TCP admin listener.
    #[command(subcommand, visible_alias = "apikey")]
    Apikeys(keys::ApiKeysCommand),
    /// The audit log: who did what, when, and how it ended.
    #[command(subcommand)]
    Audit(keys::AuditCommand),
    /// Show or replace the ACL policy.
    #[command(subcommand)]
    Policy(cluster::PolicyCommand),
    /// Cluster status and membership.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Show the hsctl version and the answering member's.
    Version,
}

/// A failure with the exit code it maps to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }
    pub fn unreachable(message: impl Into<String>) -> Self {
        CliError {
            code: EXIT_UNAVAILABLE,
            message: message.into(),
        }
    }
    pub fn other(message: impl Into<String>) -> Self {
        CliError {
            code: EXIT_FAILURE,
            message: message.into(),
        }
    }
}

/// The exit code for a gRPC status code.
pub fn exit_code(code: tonic::Code) -> u8 {
    use tonic::Code;
    match code {
        Code::Ok => EXIT_OK,
        // A client-side timeout surfaces as Cancelled ("Timeout expired").
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::ResourceExhausted => {
            EXIT_UNAVAILABLE
        }
        Code::Unauthenticated | Code::PermissionDenied => EXIT_NOPERM,
        _ => EXIT_FAILURE,
    }
}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> Self {
        let message = if status.message().is_empty() {
            status.code().description().to_string()
        } else {
            status.message().to_string()
        };
        CliError {
            code: exit_code(status.code()),
            message,
        }
    }
}

/// The exit code for a clap parse failure: 0 for --help/--version, else a usage error.
pub fn parse_error_code(error: &clap::Error) -> u8 {
    use clap::error::ErrorKind;
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => EXIT_OK,
        _ => EXIT_USAGE,
    }
}

impl Cli {
    /// Where to connect: --address wins over --socket.
    pub fn target(&self) -> Target {
        match &self.address {
            Some(address) => Target::Address {
                address: address.clone(),
                api_key: self.api_key.clone(),
            },
            None => Target::Socket(
                self.socket
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            ),
        }
    }
}

/// hsctl's entry point: parses arguments, runs the command, prints, returns the exit code.
pub fn run() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(parse_error_code(&error));
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("hsctl: starting the async runtime: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = runtime
        .block_on(execute(&cli))
        .and_then(|out| output::render(cli.output, &out));
    match result {
        Ok(text) => {
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            // A closed pipe (`hsctl … | head`) is not worth an error.
            let _ = stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("hsctl: {}", error.message);
            ExitCode::from(error.code)
        }
    }
}

/// Runs one parsed command against the member it names, under `cli.timeout`.
/// Whether reads may be answered locally (`--local`); set once per invocation.
static LOCAL_READS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub(crate) fn local_reads() -> bool {
    LOCAL_READS.load(std::sync::atomic::Ordering::Relaxed)
}

pub async fn execute(cli: &Cli) -> Result<Output, CliError> {
    LOCAL_READS.store(cli.local, std::sync::atomic::Ordering::Relaxed);
    // Local checks first, so a usage error never waits on the network.
    if let Some(address) = &cli.address
        && address.trim().is_empty()
    {
        return Err(CliError::usage("--address is empty"));
    }
    let target = cli.target();
    let timeout = cli.timeout;
    if let Command::Version = cli.command {
        return Ok(cluster::version(&target, timeout).await);
    }
    let prepared = Prepared::new(&cli.command)?;
    let work = async {
        let mut client = connect::connect(&target, timeout).await?;
        dispatch(&cli.command, prepared, &mut client).await
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(CliError::unreachable(format!(
            "no answer within {} (use --timeout to wait longer)",
            humantime::format_duration(timeout)
        ))),
    }
}

/// Inputs read before connecting (files), so their errors come first.
#[derive(Default)]
struct Prepared {
    policy: Option<String>,
}

impl Prepared {
    fn new(command: &Command) -> Result<Self, CliError> {
        let mut prepared = Prepared::default();
        if let Command::Policy(
            cluster::PolicyCommand::Set { file } | cluster::PolicyCommand::Check { file },
        ) = command
        {
            let text = std::fs::read_to_string(file).map_err(|e| {
                CliError::other(format!("reading policy file {}: {e}", file.display()))
            })?;
            prepared.policy = Some(text);
        }
        Ok(prepared)
    }
}

async fn dispatch(
    command: &Command,
    prepared: Prepared,
    client: &mut Client,
) -> Result<Output, CliError> {
    match command {
        Command::Users(cmd) => users::run(cmd, client).await,
        Command::Preauthkeys(cmd) => keys::run_preauthkeys(cmd, client).await,
        Command::Nodes(cmd) => nodes::run(cmd, client).await,
        Command::Auth(nodes::AuthCommand::Register(args)) => nodes::register(args, client).await,
        Command::Apikeys(cmd) => keys::run_apikeys(cmd, client).await,
        Command::Audit(cmd) => keys::run_audit(cmd, client).await,
        Command::Policy(cmd) => cluster::run_policy(cmd, prepared.policy, client).await,
        Command::Cluster(cmd) => cluster::run(cmd, client).await,
        Command::Version => unreachable!("handled before connecting"),
    }
}

pub use crate::proto::Expiration;

/// Comma-separated (and repeated) values with empty entries dropped.
pub(crate) fn non_empty(values: &[String]) -> Vec<String> {
    values
        .iter()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

#[cfg(test)]
mod tests;
