//! OIDC login: a real Tailscale client without an auth key follows its AuthURL through a
//! local OpenID provider (PyPI `oidc-provider-mock`), with the provider's answer landing on
//! a different member than the one that sent the browser out; the allow-lists refuse a
//! user they exclude; a forged, replayed or refused answer changes nothing.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hsd::control::client::{ControlClient, keypair};
use hsd::registry::NodeKey;
use serde_json::{Value, json};

use crate::harness::client::{ClientOpts, TsClient};
use crate::harness::{ClusterOpts, TestCluster, rt, wait_for};

const JOIN: Duration = Duration::from_secs(60);
/// An issuer for config checks (nothing listens there).
const ISSUER: &str = "http://127.0.0.1:9400";

/// The OpenID provider, on this namespace's loopback; stopped when dropped.
pub struct Provider {
    child: Child,
    pub issuer: String,
}

impl Provider {
    /// Starts it on `port` (one per test: tests run in parallel) with `users` (JSON claims,
    /// each with a `sub`) and waits for discovery.
    pub fn start(port: u16, users: &[Value]) -> Provider {
        let mut cmd = Command::new("python3");
        let port_arg = port.to_string();
        cmd.args([
            "-m",
            "oidc_provider_mock",
            "--port",
            &port_arg,
            "--require-nonce",
        ]);
        for user in users {
            cmd.args(["--user-claims", &user.to_string()]);
        }
        let child = cmd
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m oidc_provider_mock (tests/run.sh installs it)");
        let issuer = format!("http://127.0.0.1:{port}");
        let provider = Provider { child, issuer };
        wait_for("the OpenID provider", Duration::from_secs(30), || {
            let (status, _) = get(&format!(
                "{}/.well-known/openid-configuration",
                provider.issuer
            ));
            (status == 200).then_some(())
        });
        provider
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

/// (status, Location header or body) of a GET, following nothing.
fn get(url: &str) -> (u16, String) {
    rt().block_on(async {
        match http().get(url).send().await {
            Ok(r) => answer(r).await,
            Err(_) => (0, String::new()),
        }
    })
}

async fn answer(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    match r.headers().get("location") {
        Some(l) => (status, l.to_str().unwrap().to_string()),
        None => (status, r.text().await.unwrap_or_default()),
    }
}

/// Logs `sub` in at the provider's authorization URL; the provider's redirect back.
fn login_at_provider(authorize: &str, sub: &str) -> String {
    let (status, location) = rt().block_on(async {
        let r = http()
            .post(authorize)
            .form(&[("sub", sub)])
            .send()
            .await
            .unwrap();
        answer(r).await
    });
    assert_eq!(status, 302, "the provider redirects back: {location}");
    location
}

/// The provider's authorization URL that `auth_url` (a member's AuthURL) sends a browser to.
fn provider_url(auth_url: &str) -> String {
    let (status, location) = get(auth_url);
    assert!(
        (300..400).contains(&status),
        "the AuthURL redirects to the provider: {status} {location}"
    );
    location
}

/// The member's callback URL moved to another member, as a load balancer might send it.
fn on_member(callback: &str, from: &TestCluster, a: usize, b: usize) -> String {
    callback.replacen(&from.members[a].ip, &from.members[b].ip, 1)
}

/// Starts an interactive registration with the project's ts2021 client; its AuthURL.
fn begin_interactive(c: &TestCluster, member: usize, hostname: &str) -> String {
    let addr = format!("{}:8080", c.members[member].ip);
    rt().block_on(async {
        let mut client = ControlClient::connect(&addr, &keypair().0).await.unwrap();
        let (_, resp) = client
            .register(&NodeKey(keypair().1), "", hostname)
            .await
            .unwrap();
        resp["AuthURL"].as_str().expect("an AuthURL").to_string()
    })
}

pub fn oidc_yaml(idp: &Provider) -> String {
    let issuer = &idp.issuer;
    format!(
        "oidc:\n  issuer: {issuer}\n  client_id: hsd\n  client_secret: s3cret\n  \
         allowed_domains: [example.com]\n"
    )
}

fn users(c: &TestCluster) -> Vec<Value> {
    c.hsctl_json(1, &["users", "list"])
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_device_logs_in_through_the_identity_provider() {
    let idp = Provider::start(
        9400,
        &[
            json!({"sub": "alice-sub", "email": "alice@example.com", "email_verified": true,
               "preferred_username": "alice", "name": "Alice Liddell"}),
            json!({"sub": "mallory-sub", "email": "mallory@evil.example", "preferred_username": "mallory"}),
        ],
    );
    let c = TestCluster::start(
        3,
        ClusterOpts {
            extra_yaml: oidc_yaml(&idp),
            ..Default::default()
        },
    );

    // A real client with no auth key gets an AuthURL on member 1.
    let client = TsClient::start(ClientOpts {
        name: "oidcdev".into(),
        control_url: c.members[0].control_url(),
        ..Default::default()
    });
    let auth_url = wait_for("an AuthURL in the client's log", JOIN, || client.auth_url());
    let authorize = provider_url(&auth_url);
    assert!(
        authorize.starts_with(&format!("{}/oauth2/authorize?", idp.issuer)),
        "{authorize}"
    );
    let query: Vec<(String, String)> = reqwest::Url::parse(&authorize)
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(param("client_id"), "hsd");
    assert_eq!(param("code_challenge_method"), "S256");
    assert!(!param("nonce").is_empty() && !param("state").is_empty());
    assert_eq!(
        param("redirect_uri"),
        format!("{}/oidc/callback", c.members[0].control_url())
    );

    // Alice logs in; the provider's answer is taken by member 2.
    let callback = on_member(&login_at_provider(&authorize, "alice-sub"), &c, 0, 1);
    let (status, page) = get(&callback);
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("as alice"), "{page}");
    let node = c.wait_online(1, "oidcdev", JOIN);
    assert_eq!(node["user"], "alice");
    let alice = users(&c)
        .into_iter()
        .find(|u| u["name"] == "alice")
        .expect("a user made for alice");
    assert_eq!(alice["email"], "alice@example.com");
    assert_eq!(alice["display_name"], "Alice Liddell");
    assert_eq!(alice["provider"], "oidc");
    assert_eq!(alice["provider_id"], format!("{}/alice-sub", idp.issuer));

    // The same answer again is refused (the provider's code is spent) and changes nothing.
    let (status, page) = get(&on_member(&callback, &c, 1, 2));
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("invalid_grant"), "{page}");
    assert_eq!(users(&c).len(), 1);

    // Alice's second device lands on the same user, with her refreshed claims.
    let put = rt().block_on(async {
        http()
            .put(format!("{}/users/alice-sub", idp.issuer))
            .header("content-type", "application/json")
            .body(
                json!({"email": "alice@example.com", "email_verified": true,
                       "preferred_username": "alice-renamed", "name": "Alice L."})
                .to_string(),
            )
            .send()
            .await
            .unwrap()
            .status()
    });
    assert!(put.is_success(), "{put}");
    let second = begin_interactive(&c, 2, "laptop2");
    let back = login_at_provider(&provider_url(&second), "alice-sub");
    let (status, page) = get(&back);
    assert_eq!(status, 200, "{page}");
    let all = users(&c);
    assert_eq!(all.len(), 1, "no second user for the same subject: {all:?}");
    assert_eq!(all[0]["name"], "alice", "the name stays (policies use it)");
    assert_eq!(all[0]["display_name"], "Alice L.");
    assert_eq!(
        c.node(1, "laptop2").expect("laptop2 registered")["user"],
        "alice"
    );

    // Mallory's domain is not allowed: refused, recorded, nothing made.
    let third = begin_interactive(&c, 0, "intruder");
    let back = login_at_provider(&provider_url(&third), "mallory-sub");
    let (status, page) = get(&back);
    assert_eq!(status, 403, "{page}");
    assert!(
        page.contains("mallory@evil.example may not log in"),
        "{page}"
    );
    assert_eq!(users(&c).len(), 1);
    assert!(c.node(1, "intruder").is_none());
    wait_for(
        "the refusal in the audit log",
        Duration::from_secs(10),
        || {
            c.audited(1, &["--since", "1h"], |r| {
                r["actor"] == "oidc:mallory@evil.example"
                    && r["result"].as_str().unwrap_or("").contains("refused")
            })
            .then_some(())
        },
    );
    assert!(
        c.audited(1, &["--actor", "oidc:alice@example.com"], |r| {
            r["action"] == "oidc_login" && r["result"] == "ok"
        }),
        "alice's login is audited"
    );

    // A forged state, a missing code and a provider's refusal each get a clear page.
    let base = format!("{}/oidc/callback", c.members[0].control_url());
    let (status, page) = get(&format!(
        "{base}?code=x&state=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    ));
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("not valid"), "{page}");
    let (status, _) = get(&format!("{base}?state=x"));
    assert_eq!(status, 400);
    let (status, page) = get(&format!(
        "{base}?error=access_denied&error_description=denied+by+user"
    ));
    assert_eq!(status, 403);
    assert!(page.contains("access_denied"), "{page}");
    assert_eq!(users(&c).len(), 1);
    drop(client);
}

/// A bad `oidc.*` value is refused with the key named.
#[test]
fn a_bad_oidc_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hsd.yaml");
    for (oidc, key) in [
        (format!("issuer: {ISSUER}"), "oidc.client_id"),
        (
            "issuer: idp.example.com\n  client_id: a".to_string(),
            "oidc.issuer",
        ),
        (
            format!("issuer: {ISSUER}\n  client_id: a\n  pkce:\n    method: plain"),
            "oidc.pkce.method",
        ),
        (
            format!("issuer: {ISSUER}\n  client_id: a\n  colour: blue"),
            "colour",
        ),
        (
            format!("issuer: {ISSUER}\n  client_id: a\n  admin_users: [root]"),
            "oidc.admin_users",
        ),
    ] {
        std::fs::write(&config, format!("oidc:\n  {oidc}\n")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_hsd"))
            .args(["config", "check", "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{oidc}: {err}");
        assert!(err.contains(key), "{oidc}: {err}");
    }
}

/// The `name=value` pairs of a response's `Set-Cookie` headers, and their full text.
fn set_cookies(r: &reqwest::Response) -> (String, String) {
    let all: Vec<&str> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    let pairs: Vec<&str> = all.iter().map(|c| c.split(';').next().unwrap()).collect();
    (pairs.join("; "), all.join("\n"))
}

/// (status, body) of an admin API call carrying `cookies` (and `csrf` when given).
fn api_call(
    method: reqwest::Method,
    url: &str,
    cookies: &str,
    csrf: Option<&str>,
    body: Option<Value>,
) -> (u16, String) {
    rt().block_on(async {
        let mut request = http().request(method, url).header("cookie", cookies);
        if let Some(token) = csrf {
            request = request.header("x-csrf-token", token);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let r = request.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    })
}

/// A console login by `sub`, begun on member `a` and taken back by member `b`: the URL
/// `/oidc/callback` forwards the browser to, and the cookie binding the login to the
/// browser that began it.
fn console_login(c: &TestCluster, a: usize, b: usize, sub: &str) -> (String, String) {
    let start = format!("{}/admin/oidc/login", c.members[a].control_url());
    let (authorize, binding, raw) = rt().block_on(async {
        let r = http().get(&start).send().await.unwrap();
        let (cookies, raw) = set_cookies(&r);
        let location = r.headers()["location"].to_str().unwrap().to_string();
        (location, cookies, raw)
    });
    assert!(binding.starts_with("hsd_oidc_flow="), "{raw}");
    assert!(
        raw.contains("SameSite=Lax") && raw.contains("HttpOnly"),
        "{raw}"
    );
    let back = on_member(&login_at_provider(&authorize, sub), c, a, b);
    let (status, location) = get(&back);
    assert_eq!(
        status, 303,
        "the callback forwards to the console: {location}"
    );
    assert!(location.starts_with("/admin/oidc/finish?"), "{location}");
    (format!("{}{location}", c.members[b].control_url()), binding)
}

/// (status, Location or body, cookies set) of a GET carrying `cookies`.
fn get_with(url: &str, cookies: &str) -> (u16, String, String) {
    rt().block_on(async {
        let r = http()
            .get(url)
            .header("cookie", cookies)
            .send()
            .await
            .unwrap();
        let (set, _) = set_cookies(&r);
        let (status, text) = answer(r).await;
        (status, text, set)
    })
}

#[test]
fn an_admin_logs_in_to_the_console_through_the_identity_provider() {
    let idp = Provider::start(
        9401,
        &[
            json!({"sub": "root-sub", "email": "root@example.com", "email_verified": true,
               "preferred_username": "root"}),
            json!({"sub": "alice-sub", "email": "alice@example.com", "email_verified": true,
               "preferred_username": "alice"}),
            json!({"sub": "ops-sub", "email": "oncall@contractor.example",
                   "email_verified": true, "groups": ["hsd-admins", "staff"]}),
        ],
    );
    let c = TestCluster::start(
        3,
        ClusterOpts {
            extra_yaml: format!(
                "{}  admin_users: [root@example.com]\n  admin_groups: [hsd-admins]\n",
                oidc_yaml(&idp)
            ),
            ..Default::default()
        },
    );
    let url = |m: usize, path: &str| format!("{}{path}", c.members[m].control_url());
    let (status, offer) = get(&url(0, "/admin/oidc"));
    assert_eq!((status, offer.as_str()), (200, r#"{"enabled":true}"#));

    // Root logs in from member 1; the provider's answer lands on member 2.
    let (finish, binding) = console_login(&c, 0, 1, "root-sub");
    let (status, location, cookies, raw) = rt().block_on(async {
        let r = http()
            .get(&finish)
            .header("cookie", &binding)
            .send()
            .await
            .unwrap();
        let (cookies, raw) = set_cookies(&r);
        let location = r.headers()["location"].to_str().unwrap().to_string();
        (r.status().as_u16(), location, cookies, raw)
    });
    assert_eq!((status, location.as_str()), (303, "/admin"), "{raw}");
    assert!(cookies.contains("hsd_session=oidc."), "{raw}");
    assert!(
        raw.contains("HttpOnly") && raw.contains("SameSite=Strict"),
        "{raw}"
    );
    let csrf = cookies
        .split("; ")
        .find_map(|c| c.strip_prefix("hsd_csrf="))
        .expect("a CSRF token")
        .to_string();

    // The session works on every member; a write needs the CSRF token.
    let (status, body) = api_call(
        reqwest::Method::GET,
        &url(2, "/api/v1/user"),
        &cookies,
        None,
        None,
    );
    assert_eq!(status, 200, "{body}");
    let bob = Some(json!({"name": "bob"}));
    let users_url = url(2, "/api/v1/user");
    let (status, body) = api_call(
        reqwest::Method::POST,
        &users_url,
        &cookies,
        None,
        bob.clone(),
    );
    assert_eq!(status, 403, "{body}");
    assert!(users(&c).is_empty(), "a refused write changes nothing");
    let (status, body) = api_call(
        reqwest::Method::POST,
        &users_url,
        &cookies,
        Some(&csrf),
        bob,
    );
    assert_eq!(status, 200, "{body}");
    wait_for("bob, made by root", Duration::from_secs(10), || {
        let records = c.hsctl_json(1, &["audit", "list", "--actor", "oidc:root@example.com"]);
        let records = records.as_array()?;
        let made = records
            .iter()
            .any(|r| r["target"].as_str().unwrap_or("").contains("bob"));
        let logged_in = records.iter().any(|r| r["action"] == "console login");
        (made && logged_in).then_some(())
    });

    // A forged session is refused and changes nothing.
    let (status, _) = api_call(
        reqwest::Method::GET,
        &url(0, "/api/v1/user"),
        "hsd_session=oidc.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        None,
        None,
    );
    assert_eq!(status, 401);

    // Alice may join the tailnet, but she is not an admin: refused, recorded.
    let (finish, binding) = console_login(&c, 1, 2, "alice-sub");
    let (status, page, _) = get_with(&finish, &binding);
    assert_eq!(status, 403, "{page}");
    assert!(
        page.contains("alice@example.com is not an administrator"),
        "{page}"
    );
    wait_for(
        "alice's refusal in the audit log",
        Duration::from_secs(10),
        || {
            c.audited(1, &["--actor", "oidc:alice@example.com"], |r| {
                r["action"] == "authenticate (console)"
            })
            .then_some(())
        },
    );

    // The on-call engineer is an admin by group (the device allow-lists do not apply).
    // Its answer is refused in a browser that did not begin it (someone slipping their
    // own login into another's browser), and taken in the one that did.
    let (finish, binding) = console_login(&c, 2, 0, "ops-sub");
    let (status, page) = get(&finish);
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("another browser"), "{page}");
    let (status, location, set) = get_with(&finish, &binding);
    assert_eq!((status, location.as_str()), (303, "/admin"));
    assert!(set.contains("hsd_session=oidc."), "{set}");

    // A device's login cannot be turned into a console session.
    let device = begin_interactive(&c, 0, "sneaky");
    let back = login_at_provider(&provider_url(&device), "root-sub");
    let query = back.split_once('?').expect("a query").1;
    let (status, page) = get(&url(0, &format!("/admin/oidc/finish?{query}")));
    assert_eq!(status, 400, "{page}");
    assert!(c.node(1, "sneaky").is_none());
}
