//! The web console in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`), driven over WebDriver: log in, create a user and a pre-auth key,
//! watch a real client come online with its member, approve a route, edit and roll back
//! the policy, watch the cluster page while a member is killed and restarted, and the
//! same pages at phone width. Screenshots of each page go to `test-artifacts/console/`
//! (or `$HSD_TEST_ARTIFACTS`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::harness::{ClusterOpts, TestCluster, free_port, rt, wait_for};

const T: Duration = Duration::from_secs(20);
const JOIN: Duration = Duration::from_secs(60);

/// chromedriver and one browser session; both end when this is dropped.
struct Browser {
    driver: Child,
    client: Option<Client>,
    runtime: tokio::runtime::Runtime,
    shots: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        hsd::raft::tls::install_crypto_provider();
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver) must be installed: tests/run.sh does");
        let addr = format!("127.0.0.1:{port}");
        wait_for("chromedriver to listen", T, || {
            std::net::TcpStream::connect(&addr).ok()
        });
        let profile = tempfile::tempdir().unwrap();
        let options = json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", format!("--user-data-dir={}", profile.path().display())],
        });
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("goog:chromeOptions".into(), options);
        let runtime = rt();
        let client = runtime.block_on(async {
            ClientBuilder::rustls()
                .unwrap()
                .capabilities(caps)
                .connect(&format!("http://{addr}"))
                .await
                .expect("a Chromium session")
        });
        let shots = std::env::var_os("HSD_TEST_ARTIFACTS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("test-artifacts"))
            .join("console");
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            driver,
            client: Some(client),
            runtime,
            shots,
            _profile: profile,
        }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    fn goto(&self, url: &str) {
        self.runtime.block_on(self.client().goto(url)).unwrap();
    }

    /// Waits for the element `css` and returns its text.
    fn text(&self, css: &str) -> String {
        self.runtime.block_on(async {
            let e = self
                .client()
                .wait()
                .at_most(T)
                .for_element(Locator::Css(css))
                .await
                .unwrap_or_else(|e| panic!("no {css}: {e}"));
            e.text().await.unwrap()
        })
    }

    fn fill(&self, css: &str, value: &str) {
        self.runtime.block_on(async {
            let e = self
                .client()
                .wait()
                .at_most(T)
                .for_element(Locator::Css(css))
                .await
                .unwrap();
            e.clear().await.unwrap();
            e.send_keys(value).await.unwrap();
        });
    }

    fn click(&self, css: &str) {
        self.runtime.block_on(async {
            let e = self
                .client()
                .wait()
                .at_most(T)
                .for_element(Locator::Css(css))
                .await
                .unwrap_or_else(|e| panic!("no {css}: {e}"));
            e.click().await.unwrap();
        });
    }

    /// Runs `script` in the page (a returned promise is awaited).
    fn eval(&self, script: &str) -> Value {
        self.runtime
            .block_on(self.client().execute(script, vec![]))
            .unwrap()
    }

    /// Waits until `script` returns true.
    fn wait_until(&self, what: &str, script: &str) {
        let deadline = Instant::now() + JOIN;
        while self.eval(script) != json!(true) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The message bar's text once it shows one of class `kind`.
    fn message(&self, kind: &str) -> String {
        self.wait_until(
            &format!("a {kind} message"),
            &format!("const m = document.getElementById('message'); return !m.hidden && m.className === '{kind}';"),
        );
        self.text("#message")
    }

    fn clear_message(&self) {
        self.eval("const m = document.getElementById('message'); m.hidden = true; m.className = ''; return true;");
    }

    fn shot(&self, name: &str) {
        let png = self.runtime.block_on(self.client().screenshot()).unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            let _ = self.runtime.block_on(client.close());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn rows(b: &Browser, table: &str) -> usize {
    b.eval(&format!(
        "return document.querySelectorAll('#{table} tbody tr').length;"
    ))
    .as_u64()
    .unwrap() as usize
}

/// An admin logs in through the identity provider's own page (a different site than the
/// member) and lands on the console with a working session; logging out ends it.
#[test]
fn an_admin_logs_in_through_the_identity_provider() {
    let idp = crate::oidc::Provider::start(
        9402,
        &[json!({"sub": "root-sub", "email": "root@example.com", "email_verified": true})],
    );
    let yaml = format!(
        "{}  admin_users: [root@example.com]\n",
        crate::oidc::oidc_yaml(&idp)
    );
    let c = TestCluster::start(
        1,
        ClusterOpts {
            extra_yaml: yaml,
            ..Default::default()
        },
    );
    let b = Browser::start();
    b.goto(&format!("{}/admin", c.members[0].control_url()));
    b.click("#oidc-login");
    b.fill("input[name=sub]", "root-sub");
    b.shot("oidc-provider");
    b.click("form button[type=submit]");
    b.wait_until(
        "the cluster page",
        "return document.querySelectorAll('#members tbody tr').length === 1;",
    );
    assert!(b.text("#cluster-summary").contains("Leader: member"));
    b.shot("oidc-logged-in");
    assert!(
        c.audited(1, &["--actor", "oidc:root@example.com"], |r| {
            r["action"] == "console login"
        }),
        "the console login is audited"
    );
    b.click("#logout");
    b.wait_until(
        "the login form",
        "return !!document.getElementById('oidc-login');",
    );
}

#[test]
fn the_console_runs_the_tailnet_and_shows_the_cluster() {
    let mut c = TestCluster::start(3, ClusterOpts::default());
    let key = c.hsctl_json(1, &["apikeys", "create"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let b = Browser::start();
    let console = format!("{}/admin", c.members[0].control_url());

    // Log in: a wrong key is refused with a reason; the right one opens the cluster page.
    b.goto(&console);
    b.fill("#api-key", "hskey-api-wrong-wrong");
    b.click("#login button[type=submit]");
    assert!(b.message("error").contains("not valid"));
    b.shot("login");
    b.fill("#api-key", &key);
    b.click("#login button[type=submit]");
    b.wait_until(
        "three members",
        "return document.querySelectorAll('#members tbody tr').length === 3;",
    );
    assert!(b.text("#cluster-summary").contains("Leader: member"));
    b.shot("cluster");
    // The session cookie is out of the page's reach; a write without the CSRF header is refused.
    let cookies = b
        .eval("return document.cookie;")
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        cookies.contains("hsd_csrf") && !cookies.contains("hsd_session"),
        "{cookies}"
    );
    let status = b.eval("return fetch('/api/v1/user', {method: 'POST', credentials: 'same-origin', headers: {'Content-Type': 'application/json'}, body: '{\"name\": \"csrf\"}'}).then(r => r.status);");
    assert_eq!(status, json!(403));

    // Users: bad input is refused with a message and changes nothing.
    b.goto(&format!("{console}#users"));
    b.fill("#user-name", "Bad Name");
    b.click("#user-create");
    assert!(!b.message("error").is_empty());
    assert_eq!(c.hsctl_json(1, &["users", "list"]), json!([]));
    b.clear_message();
    b.fill("#user-name", "webuser");
    b.fill("#user-email", "web@example.com");
    b.click("#user-create");
    b.message("info");
    b.wait_until(
        "the user row",
        "return !!document.querySelector('#users tr[data-user=webuser]');",
    );
    b.shot("users");

    // A pre-auth key, shown once.
    b.goto(&format!("{console}#keys"));
    b.wait_until(
        "the user choice",
        "return document.querySelectorAll('#key-user option').length === 2;",
    );
    b.eval("const s = document.getElementById('key-user'); s.selectedIndex = 1; return true;");
    b.click("#key-reusable");
    b.click("#key-create");
    let auth_key = b.text("#new-key code");
    assert!(auth_key.starts_with("hskey-auth-"), "{auth_key}");
    assert_eq!(rows(&b, "keys"), 1);
    b.shot("preauthkeys");

    // A real client joins through member 2 and shows up online, served by member 2.
    let _client = c.client("webclient", 2, &auth_key, None, false);
    c.wait_online(1, "webclient", JOIN);
    b.goto(&format!("{console}#nodes"));
    b.wait_until(
        "webclient online on member 2",
        "const r = [...document.querySelectorAll('#nodes tbody tr')].find(r => r.textContent.includes('webclient'));\
         return !!r && r.querySelector('.online-cell').textContent.includes('online') && r.querySelector('.member-cell').textContent.trim() === '2';",
    );
    b.shot("nodes");

    // A route: a node advertises one, the console approves it.
    register_router(&c, &auth_key);
    b.goto(&format!("{console}#users"));
    b.goto(&format!("{console}#nodes"));
    b.wait_until("the router row", "return [...document.querySelectorAll('#nodes tbody tr')].some(r => r.textContent.includes('router'));");
    b.eval("[...document.querySelectorAll('#nodes tbody tr')].find(r => r.textContent.includes('router')).querySelector('.edit-node').click(); return true;");
    b.click("#node-panel input.route");
    b.click("#routes-save");
    b.message("info");
    let routes = c.hsctl_json(1, &["nodes", "list"]);
    let router = routes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "router")
        .unwrap()
        .clone();
    assert_eq!(
        router["approved_routes"],
        json!(["10.7.0.0/24"]),
        "{router}"
    );
    b.shot("node-routes");

    // Policy: a bad one is refused and changes nothing; two good ones, then a rollback.
    b.goto(&format!("{console}#policy"));
    b.fill(
        "#policy-text",
        r#"{"acls": [{"action": "maybe", "src": ["*"], "dst": ["*:*"]}]}"#,
    );
    b.click("#policy-save");
    assert!(b.message("error").contains("action"));
    assert_eq!(c.hsctl_json(1, &["policy", "get"])["policy"], "");
    let first = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#;
    let second = r#"{"acls": [{"action": "accept", "src": ["webuser@"], "dst": ["*:22"]}]}"#;
    for policy in [first, second] {
        b.clear_message();
        b.fill("#policy-text", policy);
        b.click("#policy-save");
        b.message("info");
        b.wait_until(
            "the new version",
            &format!(
                "return document.querySelectorAll('#policy-history tbody tr').length === {};",
                if policy == first { 1 } else { 2 }
            ),
        );
    }
    assert_eq!(c.hsctl_json(1, &["policy", "get"])["policy"], second);
    b.click("#policy-history tr[data-version='1'] .show-diff");
    assert!(b.text("#policy-diff").contains("webuser@"));
    b.shot("policy");
    b.clear_message();
    b.click("#policy-history tr[data-version='1'] .rollback");
    b.message("info");
    assert_eq!(c.hsctl_json(1, &["policy", "get"])["policy"], first);

    // The cluster page follows a member's death and return.
    b.goto(&format!("{console}#cluster"));
    b.wait_until(
        "three members",
        "return document.querySelectorAll('#members tbody tr').length === 3;",
    );
    c.member(3).kill();
    b.wait_until("member 3 unreachable", "const r = document.querySelector('#members tr[data-member=\"3\"]'); return !!r && r.querySelector('.health').textContent.includes('unreachable');");
    b.shot("cluster-member-down");
    c.member(3).start();
    b.wait_until("member 3 healthy again", "const r = document.querySelector('#members tr[data-member=\"3\"]'); return !!r && r.querySelector('.health').textContent.includes('healthy');");
    b.shot("cluster-member-back");

    // The audit log has the console's session and its writes.
    b.goto(&format!("{console}#audit"));
    b.wait_until(
        "audit rows",
        "return document.querySelectorAll('#audit tbody tr').length > 0;",
    );
    let audit = b.text("#audit");
    for action in [
        "console login",
        "create_user",
        "create_preauthkey",
        "approve_routes",
        "rollback_policy",
    ] {
        assert!(
            audit.contains(action),
            "{action} missing from the audit page"
        );
    }
    b.shot("audit");

    // Phone width: every page fits without sideways scrolling of the page itself.
    b.runtime
        .block_on(b.client().set_window_size(390, 844))
        .unwrap();
    for page in [
        "cluster", "nodes", "users", "keys", "apikeys", "policy", "audit",
    ] {
        b.goto(&format!("{console}#{page}"));
        b.wait_until(&format!("{page} drawn"), &format!("return document.getElementById('main').dataset.page === '{page}' && !!document.querySelector('#main h2');"));
        let fits = b.eval("return document.documentElement.scrollWidth <= window.innerWidth + 1;");
        assert_eq!(fits, json!(true), "{page} overflows a phone-width screen");
        b.shot(&format!("phone-{page}"));
    }
}

/// A node that advertises 10.7.0.0/24, registered through the protocol.
fn register_router(c: &TestCluster, key: &str) {
    use hsd::control::client::{ControlClient, keypair};
    let addr = format!("{}:8080", c.members[0].ip);
    rt().block_on(async {
        let mut client = ControlClient::connect(&addr, &keypair().0).await.unwrap();
        client.advertise_routes(&["10.7.0.0/24"]);
        let node = hsd::registry::NodeKey(keypair().1);
        let (status, resp) = client.register(&node, key, "router").await.unwrap();
        assert_eq!(status, 200, "{resp}");
    });
}
