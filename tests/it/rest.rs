//! `/api/v1` as a script written for headscale's REST API calls it: status and body of
//! every route, the error cases, and the OpenAPI document's routes all served.

use hsd::control::client::{ControlClient, keypair};
use hsd::registry::NodeKey;
use serde_json::{Value, json};

use crate::harness::{ClusterOpts, TestCluster, http_request, rt};

/// One member and an API key for it.
struct Api {
    cluster: TestCluster,
    addr: String,
    key: String,
}

impl Api {
    fn start() -> Api {
        let cluster = TestCluster::start(1, ClusterOpts::default());
        let addr = format!("{}:8080", cluster.members[0].ip);
        let key = cluster.hsctl_json(1, &["apikeys", "create"])["key"]
            .as_str()
            .unwrap()
            .to_string();
        Api { cluster, addr, key }
    }

    /// (status, JSON body) of an authenticated call.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_as(Some(&self.key), method, path, body)
    }

    fn call_as(
        &self,
        key: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let text = body.map(|b| b.to_string());
        let (status, reply) = http_request(&self.addr, method, path, key, text.as_deref());
        let value = serde_json::from_str(&reply)
            .unwrap_or_else(|_| panic!("{method} {path}: not JSON ({status}): {reply}"));
        (status, value)
    }

    /// An authenticated call that must answer 200; its body.
    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, value) = self.call(method, path, body);
        assert_eq!(status, 200, "{method} {path}: {value}");
        value
    }

    /// An authenticated call that must fail with `status` and gRPC `code`; its message.
    fn refused(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        status: u16,
        code: i64,
    ) -> String {
        let (got, value) = self.call(method, path, body);
        assert_eq!(
            (got, &value["code"]),
            (status, &json!(code)),
            "{method} {path}: {value}"
        );
        assert_eq!(value["details"], json!([]), "{value}");
        value["message"].as_str().unwrap().to_string()
    }
}

/// The body with every RFC 3339 time replaced by "<time>", for golden comparisons.
fn without_times(mut value: Value) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::String(s) if chrono::DateTime::parse_from_rfc3339(s).is_ok() => {
                *s = "<time>".into()
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            Value::Object(map) => map.values_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut value);
    value
}

fn in_an_hour() -> String {
    (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[test]
fn users_keys_and_api_keys_as_headscale_serves_them() {
    let api = Api::start();
    // No key, a wrong key: 401, and nothing else answered.
    let (status, body) = api.call_as(None, "GET", "/api/v1/user", None);
    assert_eq!((status, &body["code"]), (401, &json!(16)), "{body}");
    let (status, _) = api.call_as(Some("hskey-api-bogus-bogus"), "GET", "/api/v1/user", None);
    assert_eq!(status, 401);

    let created = api.ok(
        "POST",
        "/api/v1/user",
        Some(json!({"name": "ann", "displayName": "Ann Example", "email": "ann@example.com", "pictureUrl": ""})),
    );
    let id = created["user"]["id"]
        .as_str()
        .expect("ids are strings")
        .to_string();
    assert_eq!(
        without_times(created),
        json!({"user": {"id": id, "name": "ann", "createdAt": "<time>", "displayName": "Ann Example",
            "email": "ann@example.com", "providerId": "", "provider": "", "profilePicUrl": ""}})
    );
    let message = api.refused("POST", "/api/v1/user", Some(json!({"name": "ann"})), 409, 6);
    assert!(message.contains("ann"), "{message}");
    api.refused(
        "POST",
        "/api/v1/user",
        Some(json!({"name": "x", "email": "not an email"})),
        400,
        3,
    );
    api.refused("POST", "/api/v1/user", Some(json!({"name": ""})), 400, 3);
    let (status, body) = http_request(
        &api.addr,
        "POST",
        "/api/v1/user",
        Some(&api.key),
        Some("{not json"),
    );
    assert_eq!(status, 400, "{body}");

    // Filters: by id, name, email; a non-numeric id is the gateway's type mismatch.
    api.ok("POST", "/api/v1/user", Some(json!({"name": "bob"})));
    assert_eq!(
        api.ok("GET", "/api/v1/user", None)["users"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let one = api.ok("GET", &format!("/api/v1/user?id={id}"), None);
    assert_eq!(one["users"][0]["name"], "ann", "{one}");
    assert_eq!(
        api.ok("GET", "/api/v1/user?email=ann@example.com", None)["users"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        api.ok("GET", "/api/v1/user?name=nobody", None),
        json!({"users": []})
    );
    let message = api.refused("GET", "/api/v1/user?id=abc", None, 400, 3);
    assert!(message.contains("type mismatch"), "{message}");

    // Rename and delete by id.
    let renamed = api.ok("POST", &format!("/api/v1/user/{id}/rename/anne"), None);
    assert_eq!(renamed["user"]["name"], "anne");
    api.refused("POST", "/api/v1/user/9999/rename/x", None, 404, 5);

    // Pre-auth keys: created with the user's id (string or number), listed by prefix only.
    let created = api.ok(
        "POST",
        "/api/v1/preauthkey",
        Some(json!({"user": id, "reusable": true, "ephemeral": false, "expiration": in_an_hour(), "aclTags": []})),
    );
    let pak = &created["preAuthKey"];
    let full = pak["key"].as_str().unwrap().to_string();
    assert!(
        full.starts_with("hskey-auth-") && !full.ends_with("***"),
        "{pak}"
    );
    assert_eq!(pak["user"]["name"], "anne");
    assert_eq!(
        (&pak["reusable"], &pak["used"], &pak["aclTags"]),
        (&json!(true), &json!(false), &json!([]))
    );
    let key_id = pak["id"].as_str().unwrap().to_string();
    let numeric = api.ok(
        "POST",
        "/api/v1/preauthkey",
        Some(json!({"user": id.parse::<u64>().unwrap()})),
    );
    assert!(
        numeric["preAuthKey"]["expiration"].is_string(),
        "default expiry: {numeric}"
    );
    api.refused(
        "POST",
        "/api/v1/preauthkey",
        Some(json!({"user": "9999"})),
        404,
        5,
    );
    api.refused("POST", "/api/v1/preauthkey", Some(json!({})), 400, 3);
    let listed = api.ok("GET", "/api/v1/preauthkey", None)["preAuthKeys"].clone();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    let mine = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == key_id.as_str())
        .unwrap();
    assert!(
        mine["key"].as_str().unwrap().ends_with("-***"),
        "only the prefix: {mine}"
    );
    assert!(full.starts_with(mine["key"].as_str().unwrap().trim_end_matches("-***")));

    api.ok(
        "POST",
        "/api/v1/preauthkey/expire",
        Some(json!({"id": key_id})),
    );
    let listed = api.ok("GET", "/api/v1/preauthkey", None);
    let mine = listed["preAuthKeys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == key_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(mine["expired"], true, "{mine}");
    api.refused(
        "POST",
        "/api/v1/preauthkey/expire",
        Some(json!({"id": "9999"})),
        404,
        5,
    );
    assert_eq!(
        api.ok("DELETE", &format!("/api/v1/preauthkey?id={key_id}"), None),
        json!({})
    );
    api.refused(
        "DELETE",
        &format!("/api/v1/preauthkey?id={key_id}"),
        None,
        404,
        5,
    );
    assert_eq!(
        api.ok("GET", "/api/v1/preauthkey", None)["preAuthKeys"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A user is deleted by id; its keys go with it.
    let bob = api.ok("GET", "/api/v1/user?name=bob", None)["users"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        api.ok("DELETE", &format!("/api/v1/user/{bob}"), None),
        json!({})
    );
    api.refused("DELETE", &format!("/api/v1/user/{bob}"), None, 404, 5);

    // API keys: the full key once, then prefixes; expire by the listed prefix, delete.
    let created = api.ok(
        "POST",
        "/api/v1/apikey",
        Some(json!({"expiration": in_an_hour()})),
    );
    let second = created["apiKey"]
        .as_str()
        .expect("apiKey is the key itself")
        .to_string();
    assert_eq!(
        api.call_as(Some(&second), "GET", "/api/v1/user", None).0,
        200
    );
    let keys = api.ok("GET", "/api/v1/apikey", None)["apiKeys"].clone();
    let listed = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| second.starts_with(k["prefix"].as_str().unwrap().trim_end_matches("-***")))
        .expect("listed")
        .clone();
    assert!(
        listed["prefix"].as_str().unwrap().ends_with("-***"),
        "{listed}"
    );
    assert!(
        listed["id"].is_string() && listed["createdAt"].is_string(),
        "{listed}"
    );
    api.ok(
        "POST",
        "/api/v1/apikey/expire",
        Some(json!({"prefix": listed["prefix"]})),
    );
    assert_eq!(
        api.call_as(Some(&second), "GET", "/api/v1/user", None).0,
        401,
        "an expired key opens nothing"
    );
    let prefix = listed["prefix"].as_str().unwrap().to_string();
    assert_eq!(
        api.ok("DELETE", &format!("/api/v1/apikey/{prefix}"), None),
        json!({})
    );
    api.refused("DELETE", &format!("/api/v1/apikey/{prefix}"), None, 404, 5);
    api.refused("POST", "/api/v1/apikey/expire", Some(json!({})), 400, 3);

    // Health, version, unknown routes and methods.
    assert_eq!(
        api.ok("GET", "/api/v1/health", None),
        json!({"databaseConnectivity": true})
    );
    let (status, version) = api.call_as(None, "GET", "/version", None);
    assert_eq!(status, 200);
    assert!(version["version"].is_string(), "{version}");
    assert_eq!(
        api.refused("GET", "/api/v1/nothing/here", None, 404, 5),
        "Not Found"
    );
    api.refused("PATCH", "/api/v1/user", None, 405, 12);
    // Every admin call above was recorded.
    let audit = api.ok("GET", "/api/v1/audit", None);
    let actions: Vec<&str> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["action"].as_str())
        .collect();
    for action in [
        "create_user",
        "rename_user",
        "delete_user",
        "expire_preauthkey",
        "delete_preauthkey",
        "delete_apikey",
    ] {
        assert!(
            actions.contains(&action),
            "{action} missing from {actions:?}"
        );
    }
    // hsctl reads what REST wrote.
    let users = api.cluster.hsctl_json(1, &["users", "list"]);
    assert_eq!(users[0]["email"], "ann@example.com", "{users}");
}

/// Registers a node with a pre-auth key through the protocol; its hostname.
fn register_with_key(addr: &str, key: &str, hostname: &str, routes: &[&str]) {
    rt().block_on(async {
        let mut client = ControlClient::connect(addr, &keypair().0).await.unwrap();
        client.advertise_routes(routes);
        let (status, resp) = client
            .register(&NodeKey(keypair().1), key, hostname)
            .await
            .unwrap();
        assert_eq!(
            (status, &resp["MachineAuthorized"]),
            (200, &json!(true)),
            "{resp}"
        );
    });
}

/// Starts an interactive registration; its auth id (the last part of the AuthURL).
fn begin_interactive(addr: &str, hostname: &str) -> String {
    rt().block_on(async {
        let mut client = ControlClient::connect(addr, &keypair().0).await.unwrap();
        let (_, resp) = client
            .register(&NodeKey(keypair().1), "", hostname)
            .await
            .unwrap();
        let url = resp["AuthURL"].as_str().expect("an AuthURL").to_string();
        url.rsplit('/').next().unwrap().to_string()
    })
}

#[test]
fn nodes_as_headscale_serves_them() {
    let api = Api::start();
    let user = api.ok("POST", "/api/v1/user", Some(json!({"name": "ops"})))["user"].clone();
    let key = api.ok(
        "POST",
        "/api/v1/preauthkey",
        Some(json!({"user": user["id"]})),
    )["preAuthKey"]["key"]
        .as_str()
        .unwrap()
        .to_string();
    register_with_key(&api.addr, &key, "router", &["10.9.0.0/24"]);

    let nodes = api.ok("GET", "/api/v1/node", None)["nodes"].clone();
    let node = nodes[0].clone();
    let id = node["id"].as_str().expect("string id").to_string();
    assert_eq!(node["name"], "router");
    assert_eq!(node["givenName"], "router");
    assert_eq!(node["user"], user, "the user is embedded");
    assert_eq!(node["registerMethod"], "REGISTER_METHOD_AUTH_KEY");
    assert!(
        node["preAuthKey"]["key"]
            .as_str()
            .unwrap()
            .ends_with("-***"),
        "{node}"
    );
    assert!(
        node["machineKey"].as_str().unwrap().starts_with("mkey:"),
        "{node}"
    );
    assert!(
        node["nodeKey"].as_str().unwrap().starts_with("nodekey:"),
        "{node}"
    );
    assert_eq!(node["ipAddresses"].as_array().unwrap().len(), 2, "{node}");
    assert_eq!(node["availableRoutes"], json!(["10.9.0.0/24"]));
    assert_eq!(
        (&node["approvedRoutes"], &node["subnetRoutes"]),
        (&json!([]), &json!([]))
    );
    assert_eq!(node["lastSeen"], Value::Null, "never streamed: {node}");
    assert_eq!(api.ok("GET", "/api/v1/node?user=ops", None)["nodes"], nodes);
    api.refused("GET", "/api/v1/node?user=nobody-else", None, 404, 5);
    assert_eq!(
        api.ok("GET", &format!("/api/v1/node/{id}"), None)["node"],
        node
    );
    assert!(
        api.refused("GET", "/api/v1/node/abc", None, 400, 3)
            .contains("type mismatch")
    );
    api.refused("GET", "/api/v1/node/9999", None, 404, 5);

    // Rename, routes, tags, expiry.
    let renamed = api.ok("POST", &format!("/api/v1/node/{id}/rename/edge-1"), None)["node"].clone();
    assert_eq!(renamed["givenName"], "edge-1");
    api.refused(
        "POST",
        &format!("/api/v1/node/{id}/rename/Not%20a%20label"),
        None,
        400,
        3,
    );
    let routed = api.ok(
        "POST",
        &format!("/api/v1/node/{id}/approve_routes"),
        Some(json!({"routes": ["10.9.0.0/24"]})),
    )["node"]
        .clone();
    assert_eq!(routed["approvedRoutes"], json!(["10.9.0.0/24"]));
    api.refused(
        "POST",
        &format!("/api/v1/node/{id}/approve_routes"),
        Some(json!({"routes": ["not-a-cidr"]})),
        400,
        3,
    );
    let tagged = api.ok(
        "POST",
        &format!("/api/v1/node/{id}/tags"),
        Some(json!({"tags": ["tag:router"]})),
    )["node"]
        .clone();
    assert_eq!(tagged["tags"], json!(["tag:router"]));
    assert_eq!(
        tagged["user"],
        Value::Null,
        "a tagged node belongs to no user: {tagged}"
    );
    api.refused(
        "POST",
        &format!("/api/v1/node/{id}/tags"),
        Some(json!({"tags": ["router"]})),
        400,
        3,
    );
    let later = in_an_hour();
    let expiring = api.ok(
        "POST",
        &format!("/api/v1/node/{id}/expire?expiry={later}"),
        None,
    )["node"]
        .clone();
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(expiring["expiry"].as_str().unwrap()).unwrap(),
        chrono::DateTime::parse_from_rfc3339(&later).unwrap()
    );
    assert_eq!(expiring["expired"], false);
    let never = api.ok(
        "POST",
        &format!("/api/v1/node/{id}/expire?disableExpiry=true"),
        None,
    )["node"]
        .clone();
    assert_eq!(never["expiry"], Value::Null, "{never}");
    let expired = api.ok("POST", &format!("/api/v1/node/{id}/expire"), None)["node"].clone();
    assert_eq!(expired["expired"], true, "{expired}");

    // Interactive registrations: headscale's two ways to complete them.
    let auth_id = begin_interactive(&api.addr, "laptop");
    api.refused(
        "POST",
        "/api/v1/auth/register",
        Some(json!({"user": "nobody", "authId": auth_id})),
        404,
        5,
    );
    let registered = api.ok(
        "POST",
        "/api/v1/auth/register",
        Some(json!({"user": "ops", "authId": auth_id})),
    )["node"]
        .clone();
    assert_eq!(
        (&registered["name"], &registered["registerMethod"]),
        (&json!("laptop"), &json!("REGISTER_METHOD_CLI"))
    );
    assert_eq!(registered["preAuthKey"], Value::Null);
    let auth_id = begin_interactive(&api.addr, "desktop");
    let registered = api.ok(
        "POST",
        &format!("/api/v1/node/register?user=ops&key={auth_id}"),
        None,
    )["node"]
        .clone();
    assert_eq!(registered["name"], "desktop");
    api.refused(
        "POST",
        "/api/v1/auth/approve",
        Some(json!({"authId": "unknown"})),
        404,
        5,
    );
    api.refused(
        "POST",
        "/api/v1/auth/reject",
        Some(json!({"authId": ""})),
        400,
        3,
    );
    // A rejected registration is void: completing it afterwards finds nothing.
    let auth_id = begin_interactive(&api.addr, "stranger");
    assert_eq!(
        api.ok(
            "POST",
            "/api/v1/auth/reject",
            Some(json!({"authId": auth_id}))
        ),
        json!({})
    );
    api.refused(
        "POST",
        "/api/v1/auth/register",
        Some(json!({"user": "ops", "authId": auth_id})),
        404,
        5,
    );
    api.refused(
        "POST",
        "/api/v1/auth/reject",
        Some(json!({"authId": auth_id})),
        404,
        5,
    );

    assert_eq!(
        api.ok("POST", "/api/v1/node/backfillips?confirmed=true", None),
        json!({"changes": []})
    );
    api.refused("POST", "/api/v1/node/backfillips", None, 500, 2);
    assert_eq!(
        api.ok("DELETE", &format!("/api/v1/node/{id}"), None),
        json!({})
    );
    api.refused("GET", &format!("/api/v1/node/{id}"), None, 404, 5);
    assert_eq!(
        api.ok("GET", "/api/v1/node", None)["nodes"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn policy_and_the_openapi_document() {
    let api = Api::start();
    let empty = api.ok("GET", "/api/v1/policy", None);
    assert_eq!(empty, json!({"policy": "", "updatedAt": null}));
    let policy = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#;
    api.ok(
        "POST",
        "/api/v1/policy/check",
        Some(json!({"policy": policy})),
    );
    let message = api.refused(
        "POST",
        "/api/v1/policy/check",
        Some(json!({"policy": "{\"acls\": [{\"action\": \"maybe\"}]}"})),
        400,
        3,
    );
    assert!(message.contains("action"), "{message}");
    assert_eq!(
        api.ok("GET", "/api/v1/policy", None),
        empty,
        "a check changes nothing"
    );
    let set = api.ok("PUT", "/api/v1/policy", Some(json!({"policy": policy})));
    assert_eq!(set["policy"], policy);
    assert!(set["updatedAt"].is_string(), "{set}");
    api.ok("PUT", "/api/v1/policy", Some(json!({"policy": "{}"})));
    let history = api.ok("GET", "/api/v1/policy/history", None)["versions"].clone();
    assert_eq!(history.as_array().unwrap().len(), 2, "{history}");
    let first = history[0]["version"].clone();
    assert!(first.is_string(), "{history}");
    let back = api.ok(
        "POST",
        "/api/v1/policy/rollback",
        Some(json!({"version": first})),
    );
    assert_eq!(back["policy"], policy);
    api.refused(
        "POST",
        "/api/v1/policy/rollback",
        Some(json!({"version": "99"})),
        404,
        5,
    );

    // The document is public and every operation it names is served.
    let (status, doc) = api.call_as(None, "GET", "/api/v1/openapi.json", None);
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 25, "{}", paths.len());
    for (path, operations) in paths {
        for method in operations.as_object().unwrap().keys() {
            // Placeholders that name nothing: the route answers, with a reason of its own.
            let concrete = path
                .replace("{node_id}", "999999")
                .replace("{id}", "999999")
                .replace("{old_id}", "999999")
                .replace("{new_name}", "x")
                .replace("{prefix}", "nothing");
            if method == "put" || (method == "post" && concrete.ends_with("/apikey")) {
                continue; // would change the policy or make a key: covered above
            }
            let (status, body) = api.call(&method.to_uppercase(), &concrete, Some(json!({})));
            let unrouted = status == 405 || (status == 404 && body["message"] == "Not Found");
            assert!(
                !unrouted,
                "{method} {path} is documented but not served: {status} {body}"
            );
        }
    }
}

#[test]
fn rest_reads_answer_on_every_member() {
    let c = TestCluster::start(3, ClusterOpts::default());
    let key = c.hsctl_json(1, &["apikeys", "create"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    c.hsctl_json(1, &["users", "create", "everywhere"]);
    for member in &c.members {
        let addr = format!("{}:8080", member.ip);
        let (status, body) = http_request(
            &addr,
            "GET",
            "/api/v1/user?name=everywhere",
            Some(&key),
            None,
        );
        assert_eq!(status, 200, "{body}");
        let users: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            users["users"].as_array().unwrap().len(),
            1,
            "member {}: {body}",
            member.ip
        );
        let (status, body) = http_request(&addr, "GET", "/api/v1/cluster/status", Some(&key), None);
        assert_eq!(status, 200, "{body}");
        let status: Value = serde_json::from_str(&body).unwrap();
        assert!(
            status["leader"].is_string() && status["members"].as_array().unwrap().len() == 3,
            "{status}"
        );
    }
}
