//! The one shared harness: real `hsd` members (as processes, through their config files),
//! `hsctl` runs, and real Tailscale clients (Caddy + caddy-tailscale, i.e. tsnet).
//!
//! Everything here runs inside the loopback-only network namespace `tests/run.sh` makes;
//! `guard()` refuses to start anything elsewhere. Each test gets its own loopback /24
//! (`127.0.<net>.<member>`), so tests run in parallel with the default ports.

#![allow(dead_code)]

pub mod client;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub use client::TsClient;

static NEXT_NET: AtomicU8 = AtomicU8::new(10);

/// Panics unless this process is in a network namespace with only loopback: real clients
/// must never reach a public Tailscale server.
pub fn guard() {
    // /proc/self/net/dev lists this process's namespace (sysfs may show the host's).
    let dev = std::fs::read_to_string("/proc/self/net/dev").unwrap_or_default();
    let ifaces: Vec<String> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|n| n.trim().to_string())
        .collect();
    assert!(
        ifaces.iter().all(|i| i == "lo"),
        "integration tests must run in a loopback-only network namespace (use tests/run.sh); interfaces here: {ifaces:?}"
    );
    let version = Command::new(hsd_bin())
        .arg("--version")
        .output()
        .expect("run hsd --version");
    assert!(
        String::from_utf8_lossy(&version.stdout).contains("fault-injection"),
        "the fault tests need hsd built with `--features fault-injection` (tests/run.sh does that)"
    );
}

pub fn hsd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hsd")
}

pub fn hsctl_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hsctl")
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
/// A single-threaded runtime for a test's async client code.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a test runtime")
}

pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Options for the members of a test cluster.
#[derive(Clone, Default)]
pub struct ClusterOpts {
    pub manual_approval: bool,
    /// Extra top-level YAML appended to every member's config.
    pub extra_yaml: String,
    /// `cluster.snapshot_every` (default: the server's).
    pub snapshot_every: Option<u64>,
    /// `ephemeral_node_inactivity_timeout` (default 30s).
    pub ephemeral_timeout: Option<&'static str>,
    /// Leave `cluster.tls` unset, so a one-member cluster makes its own CA and certificate
    /// (the embedded default). Otherwise every member gets a certificate from the test's CA.
    pub self_made_tls: bool,
    /// Serve the control port (and DERP) over TLS with certificates from a test web CA
    /// (`web_ca_dir`), as a production member does; clients and members trust that CA
    /// through `SSL_CERT_FILE`, and no client sets `TS_DEBUG_USE_DERP_HTTP`.
    pub control_tls: bool,
}

/// One `hsd` process.
pub struct Member {
    pub id: u64,
    pub ip: String,
    pub dir: PathBuf,
    /// The web CA this member's control certificate comes from, when it serves TLS.
    pub web_ca: Option<PathBuf>,
    child: Option<Child>,
}

impl Member {
    pub fn control_url(&self) -> String {
        let scheme = if self.web_ca.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}:8080", self.ip)
    }

    pub fn grpc_addr(&self) -> String {
        format!("{}:50443", self.ip)
    }

    /// One metric's value from this member's `/metrics` (0 if absent).
    pub fn metric(&self, name: &str) -> f64 {
        let (_, body) = http_get(
            &format!("{}:9090", self.ip),
            "/metrics",
            Duration::from_secs(5),
        )
        .expect("metrics");
        body.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("hsd.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("hsd.log")).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "member {} already running", self.id);
        self.start_process();
        let ready = self.dir.join("ready.json");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "member {} exited with {status} during start:\n{}",
                    self.id,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "member {} not ready:\n{}",
                self.id,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn start_process(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("ready.json"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("hsd.log"))
            .unwrap();
        let mut cmd = Command::new(hsd_bin());
        if let Some(ca) = &self.web_ca {
            // The DERP mesh dials the other members over https.
            cmd.env("SSL_CERT_FILE", ca);
        }
        let child = cmd
            .arg("--config")
            .arg(self.dir.join("config.yaml"))
            .arg("--ready-file")
            .arg(self.dir.join("ready.json"))
            .env("RUST_LOG", "info,hsd=debug")
            .env("HSD_FAULT_PEER_BLOCKLIST", self.dir.join("blocklist"))
            .env(
                "HSD_FAULT_LOSE_FORWARD_REPLY",
                self.dir.join("lose-forward-reply"),
            )
            .env("HSD_FAULT_SLOW_PRESENCE", self.dir.join("slow-presence"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn hsd");
        self.child = Some(child);
    }

    /// Rewrites the member's config file (for its next start).
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let path = self.dir.join("config.yaml");
        let config = std::fs::read_to_string(&path).unwrap();
        std::fs::write(path, edit(config)).unwrap();
    }

    /// Runs the member in the foreground until it exits by itself (it is expected to
    /// refuse to start); returns its exit code and what it printed.
    pub fn run_until_exit(&mut self, timeout: Duration) -> (Option<i32>, String) {
        assert!(self.child.is_none(), "member {} already running", self.id);
        self.start_process();
        let code = self.wait_exit(timeout);
        (code, self.log())
    }

    /// Waits until the running member exits by itself; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        self.wait_child(timeout, "still running")
    }

    /// SIGTERM, then wait for a clean exit; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let pid = self.child.as_ref()?.id();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        self.wait_child(Duration::from_secs(30), "did not stop after SIGTERM")
    }

    /// Waits for the member's process to exit; kills it and fails the test (saying
    /// `what`) after `timeout`.
    fn wait_child(&mut self, timeout: Duration, what: &str) -> Option<i32> {
        let mut child = self.child.take()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "member {} {what} within {timeout:?}:\n{}",
                    self.id,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGSTOP: the process freezes (a stalled VM, a long GC pause) but keeps its sockets.
    pub fn pause(&mut self) {
        self.signal("-STOP");
    }

    /// SIGCONT after `pause`.
    pub fn resume(&mut self) {
        self.signal("-CONT");
    }

    pub fn signal(&mut self, sig: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .arg(sig)
                .arg(child.id().to_string())
                .status();
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Member {
    /// For a failing test: whether the member still runs, its last warnings and lines.
    fn report(&mut self) {
        let state = match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(status))) => format!("exited: {status}"),
            Some(Ok(None)) => "running".into(),
            _ => "not running".into(),
        };
        let log = self.log();
        let notable: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.starts_with("hsd:"))
            .filter(|l| !l.contains("openraft"))
            .collect();
        let notable = &notable[notable.len().saturating_sub(15)..];
        let tail: Vec<&str> = log.lines().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        eprintln!(
            "--- member {} ({state}): last warnings ---\n{}\n--- last lines ---\n{}",
            self.id,
            notable.join("\n"),
            tail.join("\n")
        );
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        // A failing test shows what each member said last.
        if std::thread::panicking() {
            self.report();
        }
        // A paused process cannot die of SIGKILL until it is continued.
        self.resume();
        self.kill();
    }
}

/// A set of members sharing one Noise key and one DERP mesh key.
pub struct TestCluster {
    pub net: u8,
    // Members drop (and print their logs on failure) before `root` removes their files.
    pub members: Vec<Member>,
    pub root: tempfile::TempDir,
    opts: ClusterOpts,
}

impl TestCluster {
    /// The test's cluster CA (`ca.pem`, `ca.key`).
    pub fn ca_dir(&self) -> PathBuf {
        self.root.path().join("ca")
    }

    /// The test's web CA (`ca.pem`, `ca.key`), which issues control-port certificates
    /// when `control_tls` is set.
    pub fn web_ca_dir(&self) -> PathBuf {
        self.root.path().join("webca")
    }

    /// Issues member `id` a new control-port certificate and key from the web CA and
    /// writes them over the member's files; returns the new certificate's DER.
    pub fn rotate_control_cert(&self, id: u64) -> Vec<u8> {
        let m = &self.members[(id - 1) as usize];
        let fresh = self.root.path().join(format!("rotated-{id}"));
        let (cert, key) = hsd::raft::tls::issue_member_cert(
            &self.web_ca_dir(),
            id,
            &fresh,
            std::slice::from_ref(&m.ip),
            Duration::from_secs(86_400),
        )
        .expect("issue a control certificate");
        let web = m.dir.join("web");
        std::fs::copy(&key, web.join(format!("member-{id}.key"))).unwrap();
        std::fs::copy(&cert, web.join(format!("member-{id}.pem"))).unwrap();
        pem_der(&std::fs::read_to_string(cert).unwrap())
    }

    fn ip(&self, i: usize) -> String {
        format!("127.0.{}.{i}", self.net)
    }

    /// Writes member `i`'s config, listing members `1..=listed` as the cluster.
    fn write_config(&self, i: usize, listed: usize) -> Member {
        let dir = self.root.path().join(format!("m{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let keys = self.root.path().join("keys");
        let a = self.ip(i);
        let scheme = if self.opts.control_tls {
            "https"
        } else {
            "http"
        };
        let mut yaml = format!(
            "server_url: {scheme}://{a}:8080\n\
             listen_addr: {a}:8080\n\
             grpc_listen_addr: {a}:50443\n\
             metrics_listen_addr: {a}:9090\n\
             data_dir: {dir}\n\
             noise:\n  private_key_path: {keys}/noise.key\n\
             derp:\n  server:\n    stun_listen_addr: {a}:3478\n    mesh_key_path: {keys}/mesh.key\n\
             node_approval: {approval}\n\
             ephemeral_node_inactivity_timeout: {ephemeral}\n\
             cluster:\n  member_id: {i}\n  listen_addr: {a}:50444\n  election_timeout: 600ms\n  heartbeat_interval: 100ms\n",
            dir = dir.display(),
            keys = keys.display(),
            approval = if self.opts.manual_approval {
                "manual"
            } else {
                "auto"
            },
            ephemeral = self.opts.ephemeral_timeout.unwrap_or("30s"),
        );
        if let Some(every) = self.opts.snapshot_every {
            yaml.push_str(&format!("  snapshot_every: {every}\n"));
        }
        if !self.opts.self_made_tls {
            let (cert, key) = hsd::raft::tls::issue_member_cert(
                &self.ca_dir(),
                i as u64,
                &dir,
                &[],
                hsd::raft::tls::DEFAULT_VALIDITY,
            )
            .expect("issue a member certificate");
            yaml.push_str(&format!(
                "  tls:\n    ca_cert_path: {}\n    cert_path: {}\n    key_path: {}\n",
                self.ca_dir().join(hsd::raft::tls::CA_CERT_FILE).display(),
                cert.display(),
                key.display()
            ));
        }
        if listed > 1 {
            yaml.push_str("  members:\n");
            for m in 1..=listed {
                let ip = self.ip(m);
                yaml.push_str(&format!("    - {{ id: {m}, address: \"{ip}:50444\", control_url: \"{scheme}://{ip}:8080\" }}\n"));
            }
        }
        let web_ca = self.opts.control_tls.then(|| {
            let (cert, key) = hsd::raft::tls::issue_member_cert(
                &self.web_ca_dir(),
                i as u64,
                &dir.join("web"),
                std::slice::from_ref(&a),
                Duration::from_secs(86_400),
            )
            .expect("issue a control certificate");
            yaml.push_str(&format!(
                "tls_cert_path: {}\ntls_key_path: {}\n",
                cert.display(),
                key.display()
            ));
            self.web_ca_dir().join(hsd::raft::tls::CA_CERT_FILE)
        });
        yaml.push_str(&self.opts.extra_yaml);
        std::fs::write(dir.join("config.yaml"), yaml).unwrap();
        Member {
            id: i as u64,
            ip: a,
            dir,
            web_ca,
            child: None,
        }
    }

    /// Starts a new member `n + 1` that knows the whole cluster but is not yet in its Raft
    /// membership (`hsctl cluster add` brings it in).
    pub fn start_new_member(&mut self) -> u64 {
        let id = self.members.len() + 1;
        let m = self.write_config(id, id);
        self.members.push(m);
        self.members[id - 1].start();
        id as u64
    }

    /// Starts `n` members and waits until one leads and every member knows it.
    pub fn start(n: usize, opts: ClusterOpts) -> TestCluster {
        guard();
        let net = NEXT_NET.fetch_add(1, Ordering::SeqCst);
        let root = tempfile::tempdir().expect("tempdir");
        let keys = root.path().join("keys");
        std::fs::create_dir_all(&keys).unwrap();
        let mut cluster = TestCluster {
            net,
            root,
            members: Vec::new(),
            opts,
        };
        hsd::raft::tls::init_ca(&cluster.ca_dir()).expect("a test cluster CA");
        if cluster.opts.control_tls {
            hsd::raft::tls::init_ca(&cluster.web_ca_dir()).expect("a test web CA");
        }
        for i in 1..=n {
            let m = cluster.write_config(i, n);
            cluster.members.push(m);
        }
        // Shared keys, written before any member starts (members must not race to create them).
        let random_hex = || hex::encode(rand::random::<[u8; 32]>());
        std::fs::write(
            keys.join("noise.key"),
            format!("privkey:{}\n", random_hex()),
        )
        .unwrap();
        std::fs::write(keys.join("mesh.key"), format!("{}\n", random_hex())).unwrap();
        for m in cluster.members.iter_mut() {
            m.start();
        }
        cluster.wait_leader();
        cluster
    }

    /// Cuts member-to-member traffic between `side` and every other member, both ways
    /// (through the members' fault-injection block lists).
    pub fn partition(&self, side: &[u64]) {
        for m in &self.members {
            let blocked: Vec<String> = self
                .members
                .iter()
                .filter(|o| side.contains(&m.id) != side.contains(&o.id))
                .map(|o| format!("{}:50444", o.ip))
                .collect();
            std::fs::write(m.dir.join("blocklist"), blocked.join("\n")).unwrap();
        }
    }

    /// Ends every partition.
    pub fn heal(&self) {
        for m in &self.members {
            std::fs::write(m.dir.join("blocklist"), "").unwrap();
        }
    }

    /// Deletes a stopped member's data (Raft log and state), keeping its config.
    pub fn wipe(&mut self, id: u64) {
        let m = self.member(id);
        assert!(!m.is_running(), "stop member {id} before wiping it");
        std::fs::remove_dir_all(m.dir.join("raft")).expect("remove raft data");
    }

    pub fn member(&mut self, id: u64) -> &mut Member {
        &mut self.members[(id - 1) as usize]
    }

    /// Waits until every running member reports the same leader; returns it.
    pub fn wait_leader(&mut self) -> u64 {
        let running: Vec<u64> = self
            .members
            .iter_mut()
            .filter_map(|m| if m.is_running() { Some(m.id) } else { None })
            .collect();
        wait_for(
            "a leader known to every running member",
            Duration::from_secs(30),
            || {
                let mut leaders = Vec::new();
                for id in &running {
                    let out = self.hsctl(*id, &["cluster", "status", "-o", "json"]);
                    if !out.status.success() {
                        return None;
                    }
                    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
                    leaders.push(v["leader"].as_u64()?);
                }
                leaders.windows(2).all(|w| w[0] == w[1]).then(|| leaders[0])
            },
        )
    }

    /// Runs hsctl against member `id` over its unix socket.
    pub fn hsctl(&self, id: u64, args: &[&str]) -> Output {
        let m = &self.members[(id - 1) as usize];
        hsctl(
            &[
                &["--socket", m.socket().to_str().unwrap(), "--timeout", "10s"],
                args,
            ]
            .concat(),
        )
    }

    /// Runs hsctl with `-o json`, asserts success, parses stdout.
    /// Whether `hsctl audit list ARGS` on member `id` holds a record `matches` accepts.
    pub fn audited(&self, id: u64, args: &[&str], matches: impl Fn(&Value) -> bool) -> bool {
        let records = self.hsctl_json(id, &[&["audit", "list"], args].concat());
        let records = records.as_array().expect("audit list prints an array");
        records.iter().any(matches)
    }

    pub fn hsctl_json(&self, id: u64, args: &[&str]) -> Value {
        let out = self.hsctl(id, &[args, &["-o", "json"]].concat());
        assert!(
            out.status.success(),
            "hsctl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "hsctl {args:?} printed non-JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Creates a user and a reusable pre-auth key for it; returns the key.
    pub fn user_with_key(&self, user: &str, extra: &[&str]) -> String {
        self.hsctl_json(1, &["users", "create", user]);
        let key = self.hsctl_json(
            1,
            &[&["preauthkeys", "create", "--user", user], extra].concat(),
        );
        key["key"].as_str().expect("key field").to_string()
    }

    /// The node named `hostname`, from `nodes list` on member `id`.
    pub fn node(&self, id: u64, hostname: &str) -> Option<Value> {
        let nodes = self.hsctl_json(id, &["nodes", "list"]);
        nodes
            .as_array()?
            .iter()
            .find(|n| n["name"] == hostname)
            .cloned()
    }

    /// Starts a real client named `name` with `key` against member `member` (1-based),
    /// optionally proxying its local port to `upstream` over the tailnet.
    pub fn client(
        &self,
        name: &str,
        member: u64,
        key: &str,
        upstream: Option<String>,
        force_derp: bool,
    ) -> TsClient {
        TsClient::start(client::ClientOpts {
            name: name.into(),
            control_url: self.members[(member - 1) as usize].control_url(),
            auth_key: Some(key.to_string()),
            upstream,
            force_derp,
            ca_file: self.members[(member - 1) as usize].web_ca.clone(),
            ..Default::default()
        })
    }

    /// Waits until `hostname` is registered and online; returns its node object.
    pub fn wait_online(&self, id: u64, hostname: &str, timeout: Duration) -> Value {
        wait_for(&format!("node {hostname} online"), timeout, || {
            self.node(id, hostname).filter(|n| n["online"] == true)
        })
    }
}

/// A node's tailnet IPv4 address, from `nodes list -o json`.
pub fn ipv4(node: &Value) -> String {
    node["ip_addresses"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .filter_map(|v| v.as_str())
                .find(|s| s.contains('.'))
        })
        .expect("an IPv4 address")
        .to_string()
}

pub fn hsctl(args: &[&str]) -> Output {
    Command::new(hsctl_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run hsctl")
}

/// A plain HTTP/1.0 GET over loopback; returns (status, body).
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = addr.parse().map_err(std::io::Error::other)?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// An HTTP/1.0 request with an optional bearer token and JSON body; returns (status, body).
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some(token) = bearer {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(head.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    )
}

/// Free TCP port on 127.0.0.1 for a client's local listener.
/// The DER bytes of the first certificate in a PEM text.
pub fn pem_der(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("base64 PEM body")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
