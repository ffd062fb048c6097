//! Policy conformance: every case in `tests/fixtures/policy/` (captured from Tailscale's
//! hosted control plane, see its README) evaluated by `hsd::policy::eval` and compared the
//! way headscale's compatibility tests compare: order inside `SrcIPs`, `DstPorts`,
//! `IPProto`, `CapGrant` and route lists does not matter, `null` equals `[]`, and a node's
//! filter rules form a set. A refused policy must be refused with Tailscale's message.
//!
//! `POLICY_CASE=acl-a01 cargo test --test policy -- --nocapture` shows one case's diff.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hsd::policy::eval::{self, Case, EvalError};
use serde_json::{Value, json};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/policy")
}

fn sorted(v: &Value) -> Value {
    match v {
        Value::Null => json!([]),
        Value::Array(items) => {
            let mut items: Vec<Value> = items.iter().map(normalize).collect();
            items.sort_by_key(|i| i.to_string());
            Value::Array(items)
        }
        other => normalize(other),
    }
}

/// Lists that Tailscale does not order become sorted; `null` lists become `[]`.
fn normalize(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let v = match k.as_str() {
                        "SrcIPs" | "DstPorts" | "IPProto" | "CapGrant" | "Dsts" | "AllowedIPs"
                        | "PrimaryRoutes" | "principals" => sorted(v),
                        _ => normalize(v),
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(normalize).collect()),
        other => other.clone(),
    }
}

fn rule_set(v: &Value) -> Value {
    sorted(v)
}

/// Compares one node's expectation with what hsd computed; returns the differences.
fn compare_node(want: &Value, got: &Value) -> Vec<String> {
    let mut diffs = Vec::new();
    let (w, g) = (
        rule_set(&want["packet_filter_rules"]),
        rule_set(&got["packet_filter_rules"]),
    );
    if w != g {
        diffs.push(format!("packet_filter_rules\n  want {w}\n  got  {g}"));
    }
    let (w, g) = (normalize(&want["self"]), normalize(&got["self"]));
    if w != g {
        diffs.push(format!("self\n  want {w}\n  got  {g}"));
    }
    let empty = serde_json::Map::new();
    let wp = want["peers"].as_object().unwrap_or(&empty);
    let gp = got["peers"].as_object().unwrap_or(&empty);
    let wk: Vec<&String> = wp.keys().collect();
    let gk: Vec<&String> = gp.keys().collect();
    if wk != gk {
        diffs.push(format!("peer names\n  want {wk:?}\n  got  {gk:?}"));
    }
    for (name, wv) in wp {
        if let Some(gv) = gp.get(name)
            && normalize(wv) != normalize(gv)
        {
            diffs.push(format!(
                "peer {name}\n  want {}\n  got  {}",
                normalize(wv),
                normalize(gv)
            ));
        }
    }
    let (w, g) = (normalize(&want["ssh_rules"]), normalize(&got["ssh_rules"]));
    let null_is_empty = |v: Value| if v.is_null() { json!([]) } else { v };
    let (w, g) = (null_is_empty(w), null_is_empty(g));
    if w != g {
        diffs.push(format!("ssh_rules\n  want {w}\n  got  {g}"));
    }
    diffs
}

fn self_primaries<'a>(nodes: &'a Value, route: &str) -> Vec<&'a String> {
    nodes
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, v)| {
            v["self"]["PrimaryRoutes"]
                .as_array()
                .is_some_and(|p| p.iter().any(|r| r == route))
        })
        .map(|(name, _)| name)
        .collect()
}

fn move_route(entry: &mut Value, field: &str, route: &str, to: &mut Value) {
    let Some(list) = entry[field].as_array_mut() else {
        return;
    };
    let before = list.len();
    list.retain(|r| r != route);
    if list.len() != before {
        match to[field].as_array_mut() {
            Some(l) => l.push(json!(route)),
            None => to[field] = json!([route]),
        }
    }
}

/// Which of several online routers of one route is primary depends on the order they
/// registered, and the captures list nodes by name, not in that order. Where hsd chose a
/// different one of them than Tailscale did, the roles are swapped in hsd's answer
/// before comparing; everything else about HA (exactly one primary, every viewer
/// agreeing) is still compared.
fn align_primaries(want: &Value, got: &mut Value) {
    let mut routers: BTreeMap<String, usize> = BTreeMap::new();
    for node in want.as_object().into_iter().flatten().map(|(_, v)| v) {
        for r in node["self"]["AllowedIPs"].as_array().into_iter().flatten() {
            *routers.entry(r.as_str().unwrap_or_default().to_string()).or_default() += 1;
        }
    }
    for (route, count) in routers {
        if count < 2 || !route.contains('/') {
            continue;
        }
        let (w, g) = (self_primaries(want, &route), self_primaries(&got["nodes"], &route));
        let (Some(p), Some(q)) = (w.first().cloned().cloned(), g.first().cloned().cloned()) else {
            continue;
        };
        if w.len() != 1 || g.len() != 1 || p == q {
            continue;
        }
        let nodes = got["nodes"].as_object_mut().expect("nodes");
        let mut q_self = nodes[&q]["self"].clone();
        move_route(&mut q_self, "PrimaryRoutes", &route, &mut nodes[&p]["self"]);
        nodes[&q]["self"] = q_self;
        // The two routers see each other: what P saw of Q is what Q should see of P.
        if nodes[&p]["peers"].get(&q).is_some() && nodes[&q]["peers"].get(&p).is_some() {
            let mut seen_by_p = nodes[&p]["peers"][&q].clone();
            let mut seen_by_q = nodes[&q]["peers"][&p].clone();
            for field in ["AllowedIPs", "PrimaryRoutes"] {
                move_route(&mut seen_by_p, field, &route, &mut seen_by_q);
            }
            nodes[&p]["peers"][&q] = seen_by_p;
            nodes[&q]["peers"][&p] = seen_by_q;
        }
        for (name, view) in nodes.iter_mut() {
            if *name == p || *name == q {
                continue;
            }
            let peers = &mut view["peers"];
            if peers.get(&q).is_none() || peers.get(&p).is_none() {
                continue;
            }
            let mut q_entry = peers[&q].clone();
            for field in ["AllowedIPs", "PrimaryRoutes"] {
                move_route(&mut q_entry, field, &route, &mut peers[&p]);
            }
            peers[&q] = q_entry;
        }
    }
}

fn check_case(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let raw: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let case: Case = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let result = eval::eval(&case, "https://unused");
    if raw["error"] == json!(true) {
        let want = raw["error_message"].as_str().unwrap_or_default();
        return match result {
            Err(EvalError::Policy(e)) if e.0.contains(want) || want.contains(&e.0) => Ok(()),
            Err(e) => Err(format!("refused with {e:?}, Tailscale said {want:?}")),
            Ok(_) => Err(format!("accepted; Tailscale refused it: {want:?}")),
        };
    }
    let mut got = result.map_err(|e| format!("refused: {e}"))?;
    align_primaries(&raw["expect"], &mut got);
    let mut diffs = Vec::new();
    for (node, want) in raw["expect"].as_object().into_iter().flatten() {
        for d in compare_node(want, &got["nodes"][node]) {
            diffs.push(format!("{node}: {d}"));
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs.join("\n"))
    }
}

/// The share of cases each category must pass (the targets).
const REQUIRED: &[(&str, f64)] = &[("acl", 1.0), ("routes", 1.0), ("ssh", 1.0), ("grant", 0.95)];

#[test]
fn conformance_with_tailscale_captures() {
    let only = std::env::var("POLICY_CASE").ok();
    let mut report: BTreeMap<&str, (usize, usize, Vec<String>)> = BTreeMap::new();
    for (category, _) in REQUIRED {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(fixtures().join(category))
            .expect("fixtures present")
            .map(|e| e.expect("dir entry").path())
            .collect();
        paths.sort();
        let entry = report.entry(category).or_default();
        for path in paths {
            let id = path.file_stem().unwrap().to_string_lossy().to_string();
            if only.as_ref().is_some_and(|o| *o != id) {
                continue;
            }
            entry.1 += 1;
            match check_case(&path) {
                Ok(()) => entry.0 += 1,
                Err(why) => {
                    if only.is_some() {
                        println!("{id}:\n{why}");
                    }
                    entry.2.push(id);
                }
            }
        }
    }
    let mut failed = Vec::new();
    for (category, required) in REQUIRED {
        let (pass, total, fails) = &report[category];
        println!("{category:7} {pass}/{total} passed; failing: {fails:?}");
        if only.is_none() && (*pass as f64) < required * *total as f64 {
            failed.push(format!("{category}: {pass}/{total}"));
        }
    }
    assert!(failed.is_empty(), "below target: {failed:?}");
}
