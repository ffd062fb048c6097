//! `hsd`: args → Config → telemetry → Server::start → wait for a signal → shutdown.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hsd::config::Config;
use hsd::server::{Failure, Server, StartError};
use hsd::util::error_chain;

/// jemalloc: a member's many small, short-lived buffers (frames, JSON, per-session state)
/// cost glibc's malloc a third of the CPU under load, and it returns freed memory better.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's start-up options (read as C's `malloc_conf`): a background thread hands freed
/// pages back to the kernel after a second, so a member's resident size follows its load
/// down after a burst of joins instead of keeping the peak.
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);
// SAFETY: a pointer to an immutable, 'static C string.
unsafe impl Sync for MallocConf {}
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: MallocConf =
    MallocConf(c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// rocksdb allocates its memtables with the C allocator, in blocks of
/// `MEMTABLE_BLOCK_BYTES`. glibc maps a block that large on its own only until the first one
/// is freed; then it raises its threshold to that size and serves later blocks from its
/// heap, where freeing them returns nothing to the OS. A fixed threshold keeps each block
/// its own mapping, so a flushed memtable (see `reclaim_memtables`) leaves the process.
fn map_memtable_blocks_alone() {
    #[cfg(target_env = "gnu")]
    {
        let threshold = hsd::raft::MEMTABLE_BLOCK_BYTES as libc::c_int;
        // SAFETY: mallopt only changes glibc's tuning, before any rocksdb allocation.
        if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, threshold) } != 1 {
            tracing::warn!("glibc refused a fixed mmap threshold; flushed memtables stay resident");
        }
    }
}

/// The client-facing runtime's threads run one step below the Raft and admin runtimes
/// (nice 5; theirs are started from the main thread and keep 0), so that when thousands of
/// clients reconnect at once the OS still gives consensus and `hsctl` the CPU on time.
fn below_raft_and_admin() {
    // SAFETY: no pointers; on Linux `who = 0` is the calling thread. Lowering one's own
    // priority needs no privilege, and failing leaves it as it was.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 5);
    }
}

/// Exit code for a usage or configuration error (EX_USAGE).
use hsd::server::supervisor::EXIT_CONFIG;

#[derive(Parser)]
#[command(
    name = "hsd",
    version = hsd::server::VERSION_LONG,
    about = "Clustered, self-hosted Tailscale control server"
)]
struct Args {
    /// YAML config file (headscale key names). Without it, hsd runs a one-member cluster
    /// with data in ./hsd-data.
    #[arg(long, short = 'c', env = "HSD_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Overrides `data_dir`.
    #[arg(long, env = "HSD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Overrides `listen_addr` (control HTTP, DERP).
    #[arg(long)]
    listen_addr: Option<String>,
    /// Overrides `grpc_listen_addr` (admin gRPC over TCP).
    #[arg(long)]
    grpc_listen_addr: Option<String>,
    /// Overrides `metrics_listen_addr`.
    #[arg(long)]
    metrics_listen_addr: Option<String>,
    /// Overrides `derp.server.stun_listen_addr`.
    #[arg(long)]
    stun_listen_addr: Option<String>,
    /// Overrides `cluster.listen_addr`.
    #[arg(long)]
    cluster_listen_addr: Option<String>,
    /// Overrides `cluster.member_id`.
    #[arg(long, env = "HSD_MEMBER_ID")]
    member_id: Option<u64>,
    /// Overrides `server_url`.
    #[arg(long)]
    server_url: Option<String>,
    /// Overrides `cluster.tls.cert_path` (this member's certificate; members sharing one
    /// config file pass their own).
    #[arg(long, env = "HSD_CLUSTER_TLS_CERT")]
    cluster_tls_cert: Option<PathBuf>,
    /// Overrides `cluster.tls.key_path`.
    #[arg(long, env = "HSD_CLUSTER_TLS_KEY")]
    cluster_tls_key: Option<PathBuf>,
    /// Once ready, write the bound addresses here as JSON (for scripts and tests).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server (the default).
    Serve,
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCmd,
    },
    /// Member certificates for mutual TLS between members.
    Cluster {
        #[command(subcommand)]
        command: ClusterCmd,
    },
    /// Policy files, offline (no server needed).
    Policy {
        #[command(subcommand)]
        command: PolicyCmd,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Check a policy file (HuJSON); exit 1 with the reason if Tailscale would refuse it.
    Check { file: PathBuf },
    /// Compile the tailnet in CASE.json (`policy`, `users`, `nodes`) in memory and print
    /// what each node receives: packet filter, peers with AllowedIPs/PrimaryRoutes, SSH
    /// rules. Exits 1 with the error for a policy that is refused.
    Eval {
        case: PathBuf,
        /// Base URL SSH `check` actions call back to.
        #[arg(long, default_value = "https://unused")]
        server_url: String,
    },
}

/// Runs `hsd policy …`.
fn policy_command(command: &PolicyCmd) -> ExitCode {
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))
    };
    let result = match command {
        PolicyCmd::Check { file } => read(file).and_then(|text| {
            hsd::policy::Policy::parse(&text)
                .and_then(|p| hsd::policy::run_tests(&p, &Default::default()))
                .map(|_| println!("policy ok"))
                .map_err(|e| e.to_string())
        }),
        PolicyCmd::Eval { case, server_url } => read(case).and_then(|text| {
            let case: hsd::policy::eval::Case = serde_json::from_str(&text)
                .map_err(|e| format!("reading {}: {e}", case.display()))?;
            let out = hsd::policy::eval::eval(&case, server_url).map_err(|e| e.to_string())?;
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hsd: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Create the keys every member shares (noise_private.key, derp_mesh.key) in DIR,
    /// keeping any that exist. Copy them to every member.
    InitKeys {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Create a cluster CA (ca.pem, ca.key) in DIR. Keep ca.key off the members.
    InitCa {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a member certificate (member-ID.pem, member-ID.key) signed by the CA in CA_DIR.
    IssueCert {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        member_id: u64,
        #[arg(long)]
        out_dir: PathBuf,
        /// Extra names (IPs or DNS names) for the certificate, repeatable.
        #[arg(long = "name")]
        names: Vec<String>,
        /// How long the certificate is valid; issue a new one before it ends.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        valid_for: std::time::Duration,
    },
}

/// Runs `hsd cluster …`; these need no config.
fn cluster_command(command: &ClusterCmd) -> ExitCode {
    use hsd::raft::tls;
    let result = match command {
        ClusterCmd::InitKeys { dir } => init_keys(dir).map_err(Box::from),
        ClusterCmd::InitCa { dir } => tls::init_ca(dir)
            .map(|p| println!("created cluster CA {}", p.display()))
            .map_err(Box::from),
        ClusterCmd::IssueCert {
            ca_dir,
            member_id,
            out_dir,
            names,
            valid_for,
        } => tls::issue_member_cert(ca_dir, *member_id, out_dir, names, *valid_for)
            .map(|(c, k)| println!("issued {} and {}", c.display(), k.display()))
            .map_err(Box::from),
    };
    let result: Result<(), Box<dyn std::error::Error>> = result;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hsd: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Creates the shared Noise and mesh keys in `dir` if missing.
fn init_keys(dir: &std::path::Path) -> Result<(), hsd::control::keys::KeyFileError> {
    use hsd::control::keys::load_or_generate;
    for (file, prefix) in [("noise_private.key", "privkey:"), ("derp_mesh.key", "")] {
        let path = dir.join(file);
        load_or_generate(&path, prefix)?;
        println!("{}", path.display());
    }
    Ok(())
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate a config file and exit: 0 if valid, 64 with the first bad key otherwise.
    Check,
}

fn load_config(args: &Args) -> Result<Config, String> {
    let mut config = match &args.config {
        Some(path) => Config::load(path).map_err(|e| error_chain(&e))?,
        None => Config::default(),
    };
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(cert) = &args.cluster_tls_cert {
        config.cluster.tls.cert_path = Some(cert.clone());
    }
    if let Some(key) = &args.cluster_tls_key {
        config.cluster.tls.key_path = Some(key.clone());
    }
    let overrides = [
        (&args.listen_addr, &mut config.listen_addr),
        (&args.grpc_listen_addr, &mut config.grpc_listen_addr),
        (&args.metrics_listen_addr, &mut config.metrics_listen_addr),
        (
            &args.stun_listen_addr,
            &mut config.derp.server.stun_listen_addr,
        ),
        (&args.cluster_listen_addr, &mut config.cluster.listen_addr),
    ];
    for (flag, field) in overrides {
        if let Some(value) = flag {
            *field = value.clone();
        }
    }
    if let Some(id) = args.member_id {
        config.cluster.member_id = id;
    }
    if let Some(url) = &args.server_url {
        config.server_url = Some(url.clone());
    }
    config.validate().map_err(|e| error_chain(&e))?;
    Ok(config)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Cmd::Cluster { command }) = &args.command {
        return cluster_command(command);
    }
    if let Some(Cmd::Policy { command }) = &args.command {
        return policy_command(command);
    }
    hsd::raft::tls::install_crypto_provider();
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(message) => {
            eprintln!("hsd: {message}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(Cmd::Config {
        command: ConfigCmd::Check,
    }) = args.command
    {
        println!("config ok");
        return ExitCode::SUCCESS;
    }
    hsd::telemetry::init_logging(&config.log.level, config.log.format == "json");
    map_memtable_blocks_alone();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(below_raft_and_admin)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hsd: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, args.ready_file)) {
        Ok(None) => ExitCode::SUCCESS,
        // Stopped on its own (storage failure, a listener died, settings disagree): exit
        // non-zero so systemd or Kubernetes restart it (or, for 64, an operator looks).
        Ok(Some(failure)) => {
            eprintln!("hsd: {}", failure.reason);
            ExitCode::from(failure.exit_code)
        }
        Err(e) => {
            eprintln!("hsd: {e:#}");
            let is_config = e
                .downcast_ref::<StartError>()
                .is_some_and(StartError::is_config);
            ExitCode::from(if is_config { EXIT_CONFIG } else { 1 })
        }
    }
}

/// Runs the member until a signal or a failure; returns the failure, if any.
async fn run(config: Config, ready_file: Option<PathBuf>) -> anyhow::Result<Option<Failure>> {
    // SIGHUP reloads what can be reloaded (the TLS pair, a policy file); with nothing to
    // reload it must not end the member, which is the signal's default action.
    let _hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let server = Server::start(config).await?;
    if let Some(path) = ready_file {
        let json = serde_json::to_vec_pretty(server.addrs())?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json)
            .with_context(|| format!("writing ready file {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("writing ready file {}", path.display()))?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        () = server.stopped() => {}
    }
    Ok(server.shutdown().await)
}
