use std::collections::BTreeSet;

use super::*;
use crate::registry::command::{Command, ExpireUntil, NodeAuth, Proposal};
use crate::registry::secrets::{self, SecretKind};

fn at(ms: i64) -> Timestamp {
    Timestamp(1_700_000_000_000 + ms)
}

fn run(reg: &mut Registry, t: i64, command: Command) -> Outcome {
    reg.apply(&Request::single(at(t), command))
        .outcomes
        .remove(0)
}

fn key(b: u8) -> [u8; 32] {
    [b; 32]
}

fn node_request(machine: u8, node: u8, host: &str) -> NodeRequest {
    NodeRequest {
        machine_key: MachineKey(key(machine)),
        node_key: NodeKey(key(node)),
        hostname: host.into(),
        hostinfo: format!("{{\"Hostname\":\"{host}\"}}"),
        request_tags: vec![],
        ephemeral: false,
    }
}

struct Fixture {
    reg: Registry,
    key_full: String,
}

/// A registry with user "alice" and one pre-auth key with the given flags.
fn fixture(reusable: bool, expiration: Option<Timestamp>) -> Fixture {
    let mut reg = Registry::new(ClusterSettings::default());
    assert!(matches!(
        run(&mut reg, 0, Command::create_user("alice")),
        Outcome::User(_)
    ));
    let secret = secrets::generate(SecretKind::PreAuth);
    let out = run(
        &mut reg,
        1,
        Command::CreatePreAuthKey {
            user: "alice".into(),
            prefix: secret.prefix.clone(),
            hash: secret.hash,
            reusable,
            ephemeral: false,
            expiration,
            tags: vec![],
        },
    );
    assert!(matches!(out, Outcome::PreAuthKey(_)));
    Fixture {
        reg,
        key_full: secret.full,
    }
}

/// The request registering `req` at `t` with the fixture's pre-auth key.
fn registration(f: &Fixture, t: i64, req: NodeRequest) -> Request {
    let (prefix, hash) = secrets::parse(SecretKind::PreAuth, &f.key_full).unwrap();
    Request::single(
        at(t),
        Command::RegisterNode {
            request: req,
            auth: NodeAuth::PreAuthKey { prefix, hash },
            auto_approve: true,
            expiry: None,
        },
    )
}

fn register(f: &mut Fixture, t: i64, req: NodeRequest) -> Outcome {
    let request = registration(f, t, req);
    f.reg.apply(&request).outcomes.remove(0)
}

#[test]
fn duplicate_user_is_rejected_and_changes_nothing() {
    let mut f = fixture(false, None);
    let before = f.reg.clone();
    let out = run(&mut f.reg, 5, Command::create_user("alice"));
    assert_eq!(
        out,
        Outcome::Rejected(Rejection::UserExists("alice".into()))
    );
    assert!(f.reg.same_entities(&before));
}

#[test]
fn single_use_key_registers_one_machine_only() {
    let mut f = fixture(false, None);
    let out = register(&mut f, 10, node_request(1, 11, "a"));
    let Outcome::Node(node) = out else {
        panic!("{out:?}")
    };
    assert_eq!(node.ipv4.unwrap().to_string(), "100.64.0.1");
    assert_eq!(node.ipv6.unwrap().to_string(), "fd7a:115c:a1e0::1");
    let before = f.reg.clone();
    let out = register(&mut f, 11, node_request(2, 12, "b"));
    assert!(
        matches!(out, Outcome::Rejected(Rejection::PreAuthKeyUsed(_))),
        "{out:?}"
    );
    assert!(f.reg.same_entities(&before));
    // The same machine may log in again with its key (e.g. after a node-key rotation).
    let out = register(&mut f, 12, node_request(1, 13, "a"));
    let Outcome::Node(again) = out else {
        panic!("{out:?}")
    };
    assert_eq!(again.id, node.id);
    assert_eq!(again.ipv4, node.ipv4);
    assert_eq!(f.reg.node_count(), 1);
    // Once the node is expired (by an admin, or a logout), the used key cannot revive it.
    run(
        &mut f.reg,
        13,
        Command::ExpireNode {
            id: node.id,
            until: ExpireUntil::Now,
        },
    );
    let out = register(&mut f, 14, node_request(1, 14, "a"));
    assert!(
        matches!(out, Outcome::Rejected(Rejection::PreAuthKeyUsed(_))),
        "{out:?}"
    );
}

#[test]
fn expired_key_is_rejected_and_changes_nothing() {
    let mut f = fixture(true, Some(at(100)));
    let before = f.reg.clone();
    let out = register(&mut f, 100, node_request(1, 11, "a"));
    assert!(
        matches!(out, Outcome::Rejected(Rejection::PreAuthKeyExpired { .. })),
        "{out:?}"
    );
    assert!(f.reg.same_entities(&before));
}

#[test]
fn wrong_secret_with_right_prefix_is_unknown() {
    let mut f = fixture(true, None);
    let (prefix, _) = secrets::parse(SecretKind::PreAuth, &f.key_full).unwrap();
    let out = run(
        &mut f.reg,
        5,
        Command::RegisterNode {
            request: node_request(1, 11, "a"),
            auth: NodeAuth::PreAuthKey {
                prefix,
                hash: SecretHash::of("guess"),
            },
            auto_approve: true,
            expiry: None,
        },
    );
    assert_eq!(out, Outcome::Rejected(Rejection::PreAuthKeyNotFound));
    assert_eq!(f.reg.node_count(), 0);
}

#[test]
fn addresses_and_names_are_unique_and_deterministic() {
    let mut f = fixture(true, None);
    let mut log = Vec::new();
    for i in 0..50u8 {
        log.push(registration(
            &f,
            10 + i as i64,
            node_request(100 + i, 200u8.wrapping_add(i), "web"),
        ));
    }
    let mut replica = f.reg.clone();
    for req in &log {
        f.reg.apply(req);
        replica.apply(req);
    }
    assert!(f.reg.same_data(&replica));
    let v4: BTreeSet<_> = f.reg.nodes().map(|n| n.ipv4.unwrap()).collect();
    let names: BTreeSet<_> = f.reg.nodes().map(|n| n.given_name.clone()).collect();
    assert_eq!(v4.len(), 50);
    assert_eq!(names.len(), 50);
    assert!(names.contains("web") && names.contains("web-2"));
}

#[test]
fn node_key_of_another_machine_is_refused() {
    let mut f = fixture(true, None);
    register(&mut f, 10, node_request(1, 11, "a"));
    let out = register(&mut f, 11, node_request(2, 11, "b"));
    assert!(
        matches!(out, Outcome::Rejected(Rejection::NodeKeyInUse(_))),
        "{out:?}"
    );
}

#[test]
fn rotation_logout_and_ephemeral_removal() {
    let mut f = fixture(true, None);
    let Outcome::Node(node) = register(&mut f, 10, node_request(1, 11, "a")) else {
        panic!()
    };
    let out = run(
        &mut f.reg,
        20,
        Command::RotateNodeKey {
            machine_key: MachineKey(key(1)),
            old: NodeKey(key(11)),
            new: NodeKey(key(12)),
        },
    );
    assert!(matches!(out, Outcome::Node(_)));
    assert!(f.reg.node_by_key(&NodeKey(key(11))).is_none());
    assert_eq!(f.reg.node_by_key(&NodeKey(key(12))).unwrap().id, node.id);
    // Logout from another machine is refused.
    let out = run(
        &mut f.reg,
        21,
        Command::LogoutNode {
            machine_key: MachineKey(key(9)),
            node_key: NodeKey(key(12)),
        },
    );
    assert!(matches!(
        out,
        Outcome::Rejected(Rejection::MachineKeyMismatch(_))
    ));
    run(
        &mut f.reg,
        22,
        Command::LogoutNode {
            machine_key: MachineKey(key(1)),
            node_key: NodeKey(key(12)),
        },
    );
    assert!(f.reg.node(node.id).unwrap().is_expired(at(22)));

    let mut eph = node_request(3, 31, "tmp");
    eph.ephemeral = true;
    let Outcome::Node(tmp) = register(&mut f, 30, eph) else {
        panic!()
    };
    let out = run(
        &mut f.reg,
        31,
        Command::LogoutNode {
            machine_key: MachineKey(key(3)),
            node_key: NodeKey(key(31)),
        },
    );
    assert_eq!(out, Outcome::Removed(vec![tmp.id]));
    assert!(f.reg.node(tmp.id).is_none());
    // Neither its id nor (until the pool wraps) its address goes to the next node.
    let Outcome::Node(next) = register(&mut f, 32, node_request(4, 41, "n")) else {
        panic!()
    };
    assert_ne!(next.ipv4, tmp.ipv4);
    assert!(next.id > tmp.id);
}

#[test]
fn interactive_registration_completes_once_and_expires() {
    let mut reg = Registry::new(ClusterSettings::default());
    run(&mut reg, 0, Command::create_user("bob"));
    run(
        &mut reg,
        1,
        Command::BeginInteractive {
            auth_id: "abc".into(),
            request: node_request(5, 51, "laptop"),
            ttl_ms: 999,
            max_pending: 1000,
        },
    );
    let out = run(
        &mut reg,
        2,
        Command::CompleteInteractive {
            auth_id: "abc".into(),
            user: "bob".into(),
            auto_approve: false,
            expiry: None,
        },
    );
    let Outcome::Node(node) = out else {
        panic!("{out:?}")
    };
    assert!(!node.approved);
    assert_eq!(reg.pending("abc").unwrap().node, Some(node.id));
    let again = run(
        &mut reg,
        3,
        Command::CompleteInteractive {
            auth_id: "abc".into(),
            user: "bob".into(),
            auto_approve: true,
            expiry: None,
        },
    );
    assert!(matches!(
        again,
        Outcome::Rejected(Rejection::RegistrationCompleted(_))
    ));
    run(&mut reg, 1000, Command::Noop);
    assert!(reg.pending("abc").is_none());
    let out = run(
        &mut reg,
        1001,
        Command::CompleteInteractive {
            auth_id: "zzz".into(),
            user: "bob".into(),
            auto_approve: true,
            expiry: None,
        },
    );
    assert!(matches!(
        out,
        Outcome::Rejected(Rejection::RegistrationNotFound(_))
    ));
}

#[test]
fn oidc_logins_find_their_user_by_issuer_and_subject() {
    let mut reg = Registry::new(ClusterSettings::default());
    // An admin-made user already has the name the provider suggests.
    run(&mut reg, 0, Command::create_user("alice"));
    let begin = |auth_id: &str, machine: u8| Command::BeginInteractive {
        auth_id: auth_id.into(),
        request: node_request(machine, machine, "dev"),
        ttl_ms: 60_000,
        max_pending: 1000,
    };
    let login = |auth_id: &str, display: &str| Command::OidcLogin {
        auth_id: auth_id.into(),
        identity: OidcIdentity {
            issuer: "https://idp/".into(),
            subject: "s-1".into(),
            name: "alice".into(),
            display_name: display.into(),
            email: "alice@example.com".into(),
        },
        auto_approve: true,
        expiry: None,
    };
    // A login for no open registration makes no user.
    let out = run(&mut reg, 1, login("none", "Alice"));
    assert!(
        matches!(out, Outcome::Rejected(Rejection::RegistrationNotFound(_))),
        "{out:?}"
    );
    assert_eq!(reg.users().count(), 1);

    run(&mut reg, 2, begin("a1", 1));
    let Outcome::Node(first) = run(&mut reg, 3, login("a1", "Alice")) else {
        panic!("first login")
    };
    let user = reg.user(first.user).unwrap().clone();
    assert_ne!(user.name, "alice", "the admin's alice is not taken over");
    assert!(user.name.starts_with("alice-"), "{}", user.name);
    assert_eq!(user.provider_id, "https://idp/s-1");
    assert_eq!(user.display_name, "Alice");

    // The next login is the same user, with the claims refreshed.
    run(&mut reg, 4, begin("a2", 2));
    let Outcome::Node(second) = run(&mut reg, 5, login("a2", "Alice L.")) else {
        panic!("second login")
    };
    assert_eq!(second.user, first.user);
    assert_eq!(reg.user(first.user).unwrap().display_name, "Alice L.");
    assert_eq!(reg.users().count(), 2);
}

#[test]
fn user_with_nodes_cannot_be_deleted() {
    let mut f = fixture(true, None);
    register(&mut f, 10, node_request(1, 11, "a"));
    let out = run(
        &mut f.reg,
        11,
        Command::DeleteUser {
            name: "alice".into(),
        },
    );
    assert!(matches!(
        out,
        Outcome::Rejected(Rejection::UserHasNodes(_, 1))
    ));
}

#[test]
fn records_round_trip_through_storage_encoding() {
    let mut f = fixture(true, None);
    register(&mut f, 10, node_request(1, 11, "a"));
    register(&mut f, 11, node_request(2, 12, "b"));
    run(
        &mut f.reg,
        12,
        Command::CreateApiKey {
            prefix: "p".into(),
            hash: SecretHash::of("s"),
            expiration: None,
        },
    );
    let loaded = Registry::from_records(f.reg.all_records()).unwrap();
    assert!(loaded.same_data(&f.reg));
    assert_eq!(loaded.node_by_key(&NodeKey(key(12))).unwrap().hostname, "b");
    // Continuing on the loaded copy allocates exactly as the original would.
    let mut original = f.reg.clone();
    let mut reloaded = loaded;
    let req = registration(&f, 20, node_request(3, 13, "c"));
    original.apply(&req);
    reloaded.apply(&req);
    assert!(original.same_data(&reloaded));
}

/// A registry with a policy and DNS settings set, and one node.
fn with_policy_and_dns() -> (Fixture, String) {
    let mut f = fixture(true, None);
    let policy = format!(
        "{{\"acls\": [{{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"]}}], \"hosts\": {{{}}}}}",
        (0..200)
            .map(|i| format!("\"host{i}\": \"10.1.{}.{}\"", i / 250, i % 250))
            .collect::<Vec<_>>()
            .join(", ")
    );
    run(
        &mut f.reg,
        1,
        Command::SetPolicy {
            policy: policy.clone(),
        },
    );
    let dns = DnsSettings {
        magic_dns: true,
        base_domain: "tail.example".into(),
        nameservers: vec!["10.0.0.53".into()],
        search_domains: vec!["corp.example".into()],
    };
    run(&mut f.reg, 2, Command::SetDns { dns });
    register(&mut f, 10, node_request(1, 11, "a"));
    (f, policy)
}

/// A registration rewrites the counters, not the policy: a large policy would otherwise be
/// written to rocksdb again with every node that joins.
#[test]
fn a_registration_does_not_rewrite_the_policy() {
    let (mut f, policy) = with_policy_and_dns();
    let applied = f.reg.apply(&registration(&f, 20, node_request(2, 12, "b")));
    assert!(applied.records.contains(&Record::Meta));
    assert!(!applied.records.contains(&Record::Policy));
    assert!(!applied.records.contains(&Record::Dns));
    let (_, meta) = f.reg.encode_record(&Record::Meta);
    let meta = meta.unwrap();
    assert!(meta.len() < 300, "meta is {} bytes", meta.len());
    let (_, stored) = f.reg.encode_record(&Record::Policy);
    let stored: String = serde_json::from_slice(&stored.unwrap()).unwrap();
    assert_eq!(stored, policy);
}

/// A snapshot keeps the policy and DNS settings inside `meta`, where earlier versions read
/// them; both layouts load back to the same registry.
#[test]
fn snapshot_layout_keeps_settings_inside_meta() {
    let (f, policy) = with_policy_and_dns();
    let snapshot = f.reg.snapshot_records();
    assert!(
        snapshot
            .iter()
            .all(|(k, _)| k.as_slice() != b"policy" && k.as_slice() != b"dns")
    );
    let (_, meta) = snapshot
        .iter()
        .find(|(k, _)| k.as_slice() == b"meta")
        .unwrap();
    let meta: serde_json::Value = serde_json::from_slice(meta).unwrap();
    assert_eq!(meta["policy"], policy.as_str());
    assert_eq!(meta["dns"]["base_domain"], "tail.example");
    assert!(meta["next_node"].as_u64().unwrap() >= 1);
    for records in [snapshot, f.reg.all_records()] {
        let loaded = Registry::from_records(records).unwrap();
        assert!(loaded.same_data(&f.reg));
        assert_eq!(loaded.policy(), policy);
        assert_eq!(loaded.dns().unwrap().base_domain, "tail.example");
    }
}

/// A store written before the policy and DNS settings had records of their own (both
/// inside `meta`) loads with them, and DNS cleared in the new layout stays cleared.
#[test]
fn a_store_from_an_earlier_version_loads() {
    let (f, policy) = with_policy_and_dns();
    let old: Vec<_> = f.reg.snapshot_records();
    let loaded = Registry::from_records(old).unwrap();
    assert_eq!(loaded.policy(), policy);
    assert!(loaded.dns().is_some());
    assert!(loaded.same_data(&f.reg));

    let mut records = f.reg.all_records();
    records.retain(|(k, _)| k.as_slice() != b"dns");
    let loaded = Registry::from_records(records).unwrap();
    assert!(loaded.dns().is_none());
    assert_eq!(loaded.policy(), policy);
}

#[test]
fn applied_effects_name_every_touched_record() {
    let mut f = fixture(false, None);
    let applied = f.reg.apply(&registration(&f, 10, node_request(1, 11, "a")));
    let Outcome::Node(node) = applied.outcomes[0].clone() else {
        panic!()
    };
    assert!(applied.records.contains(&Record::Node(node.id)));
    assert!(applied.records.contains(&Record::Meta));
    assert!(
        applied
            .records
            .iter()
            .any(|r| matches!(r, Record::PreAuthKey(_)))
    );
    assert_eq!(applied.changes, vec![Change::NodeUpserted(node.id)]);
}

#[test]
fn invalid_tags_and_names_are_rejected() {
    let mut f = fixture(true, None);
    let secret = secrets::generate(SecretKind::PreAuth);
    let out = run(
        &mut f.reg,
        5,
        Command::CreatePreAuthKey {
            user: "alice".into(),
            prefix: secret.prefix,
            hash: secret.hash,
            reusable: false,
            ephemeral: false,
            expiration: None,
            tags: vec!["server".into()],
        },
    );
    assert!(matches!(out, Outcome::Rejected(Rejection::InvalidTag(_))));
    let out = run(&mut f.reg, 6, Command::create_user("has space"));
    assert!(matches!(out, Outcome::Rejected(Rejection::InvalidName(..))));
}

#[test]
fn a_repeated_request_id_answers_the_first_outcome_and_changes_nothing() {
    let mut f = fixture(true, None);
    let secret = secrets::generate(SecretKind::PreAuth);
    let proposal = Proposal::new(Command::CreatePreAuthKey {
        user: "alice".into(),
        prefix: secret.prefix,
        hash: secret.hash,
        reusable: false,
        ephemeral: false,
        expiration: None,
        tags: vec![],
    });
    let entry = |t| Request {
        at: at(t),
        proposals: vec![proposal.clone()].into(),
    };
    let first = f.reg.apply(&entry(10)).outcomes.remove(0);
    let keys = f.reg.preauth_keys().count();
    // The retry lands in a later entry (a forward retried after a lost reply).
    let again = f.reg.apply(&entry(20));
    assert_eq!(again.outcomes, vec![first]);
    assert!(again.changes.is_empty());
    assert_eq!(f.reg.preauth_keys().count(), keys, "applied once");
    // A user create retried the same way is not "already exists".
    let create = Proposal::new(Command::create_user("bob"));
    let once = f.reg.apply(&Request {
        at: at(30),
        proposals: vec![create.clone()].into(),
    });
    let twice = f.reg.apply(&Request {
        at: at(31),
        proposals: vec![create].into(),
    });
    assert!(matches!(once.outcomes[0], Outcome::User(_)));
    assert_eq!(once.outcomes, twice.outcomes);
}

#[test]
fn remembered_outcomes_are_forgotten_after_the_window_and_survive_storage() {
    let mut reg = Registry::new(ClusterSettings::default());
    let create = Proposal::new(Command::create_user("a"));
    reg.apply(&Request {
        at: at(0),
        proposals: vec![create.clone()].into(),
    });
    assert_eq!(reg.recent_count(), 1);
    let loaded = Registry::from_records(reg.all_records()).unwrap();
    assert!(loaded.same_data(&reg));
    assert_eq!(loaded.recent_count(), 1);
    // Eleven minutes later the id is forgotten (the entry itself is remembered anew).
    run(&mut reg, 11 * 60 * 1000, Command::Noop);
    assert_eq!(reg.recent_count(), 1);
    let late = reg.apply(&Request {
        at: at(11 * 60 * 1000 + 1),
        proposals: vec![create].into(),
    });
    assert_eq!(
        late.outcomes[0],
        Outcome::Rejected(Rejection::UserExists("a".into())),
        "outside the window a repeat is applied as a new write"
    );
}

#[test]
fn the_clock_never_goes_backwards() {
    let mut reg = Registry::new(ClusterSettings::default());
    run(&mut reg, 1000, Command::Noop);
    // A new leader with a slow clock stamps an earlier time: the registry keeps its own.
    let out = run(&mut reg, 10, Command::create_user("late"));
    let Outcome::User(user) = out else {
        panic!("{out:?}")
    };
    assert_eq!(user.created_at, at(1000));
    assert_eq!(reg.clock(), at(1000));
}

#[test]
fn expiry_spans_are_measured_from_the_stamp() {
    let mut reg = Registry::new(ClusterSettings::default());
    run(&mut reg, 0, Command::create_user("bob"));
    run(
        &mut reg,
        500,
        Command::BeginInteractive {
            auth_id: "p".into(),
            request: node_request(5, 51, "laptop"),
            ttl_ms: 100,
            max_pending: 1000,
        },
    );
    assert_eq!(reg.pending("p").unwrap().expires_at, at(600));
    let out = run(
        &mut reg,
        550,
        Command::CompleteInteractive {
            auth_id: "p".into(),
            user: "bob".into(),
            auto_approve: true,
            expiry: Some(Expiry::AfterMillis(1000)),
        },
    );
    let Outcome::Node(node) = out else {
        panic!("{out:?}")
    };
    assert_eq!(node.expiry, Some(at(1550)));
}

#[test]
fn settings_are_recorded_once_and_a_different_proposal_names_the_key() {
    let mut reg = Registry::default();
    let mut f = ClusterSettings::default();
    // Without settings a node cannot get addresses.
    run(&mut reg, 0, Command::create_user("u"));
    run(
        &mut reg,
        1,
        Command::BeginInteractive {
            auth_id: "x".into(),
            request: node_request(1, 2, "h"),
            ttl_ms: 60_000,
            max_pending: 1000,
        },
    );
    let out = run(
        &mut reg,
        2,
        Command::CompleteInteractive {
            auth_id: "x".into(),
            user: "u".into(),
            auto_approve: true,
            expiry: None,
        },
    );
    assert_eq!(out, Outcome::Rejected(Rejection::SettingsMissing));
    assert_eq!(
        run(
            &mut reg,
            3,
            Command::InitSettings {
                settings: f.clone()
            }
        ),
        Outcome::Done
    );
    assert_eq!(
        run(
            &mut reg,
            4,
            Command::InitSettings {
                settings: f.clone()
            }
        ),
        Outcome::Done,
        "the same settings again are fine"
    );
    f.prefix_v4 = Some("10.0.0.0/8".parse().unwrap());
    let out = run(&mut reg, 5, Command::InitSettings { settings: f });
    let Outcome::Rejected(Rejection::SettingsMismatch {
        key,
        cluster,
        proposed,
    }) = out
    else {
        panic!("{out:?}")
    };
    assert_eq!(
        (key.as_str(), cluster.as_str(), proposed.as_str()),
        ("prefixes.v4", "100.64.0.0/10", "10.0.0.0/8")
    );
    assert_eq!(reg.settings(), Some(&ClusterSettings::default()));
}

#[test]
fn renames_keep_the_name_indexes_right() {
    let mut f = fixture(true, None);
    let Outcome::Node(a) = register(&mut f, 10, node_request(1, 11, "web")) else {
        panic!()
    };
    let Outcome::Node(b) = register(&mut f, 11, node_request(2, 12, "web")) else {
        panic!()
    };
    assert_eq!(
        (a.given_name.as_str(), b.given_name.as_str()),
        ("web", "web-2")
    );
    let out = run(
        &mut f.reg,
        12,
        Command::RenameNode {
            id: a.id,
            name: "web-2".into(),
        },
    );
    assert!(matches!(out, Outcome::Rejected(Rejection::InvalidName(..))));
    run(
        &mut f.reg,
        13,
        Command::RenameNode {
            id: a.id,
            name: "db".into(),
        },
    );
    // "web" is free again for a new node.
    let Outcome::Node(c) = register(&mut f, 14, node_request(3, 13, "web")) else {
        panic!()
    };
    assert_eq!(c.given_name, "web");
    run(
        &mut f.reg,
        15,
        Command::RenameUser {
            old: "alice".into(),
            new: "carol".into(),
        },
    );
    assert!(f.reg.user_by_name("alice").is_none());
    assert_eq!(f.reg.user_by_name("carol").unwrap().id, a.user);
}

#[test]
fn one_open_interactive_registration_per_machine_and_a_cap_on_all() {
    let mut reg = Registry::new(ClusterSettings::default());
    let begin = |auth_id: &str, machine: u8, max_pending: u32| Command::BeginInteractive {
        auth_id: auth_id.into(),
        request: node_request(machine, machine, "flood"),
        ttl_ms: 60_000,
        max_pending,
    };
    // The same machine asking again replaces its registration instead of adding one.
    run(&mut reg, 1, begin("first", 1, 2));
    run(&mut reg, 2, begin("again", 1, 2));
    assert_eq!(reg.pending_count(), 1);
    assert!(reg.pending("first").is_none());
    assert_eq!(
        reg.pending_for_machine(&MachineKey(key(1)))
            .unwrap()
            .auth_id,
        "again"
    );
    // Another machine fills the cap; a third is refused and changes nothing.
    run(&mut reg, 3, begin("other", 2, 2));
    let refused = run(&mut reg, 4, begin("third", 3, 2));
    assert!(
        matches!(refused, Outcome::Rejected(Rejection::TooManyPending(2))),
        "{refused:?}"
    );
    assert_eq!(reg.pending_count(), 2);
    // At the cap, a machine that already waits may still renew its own.
    run(&mut reg, 5, begin("renewed", 2, 2));
    assert_eq!(reg.pending_count(), 2);
}

#[test]
fn admin_writes_are_audited_once_with_their_outcome() {
    let mut reg = Registry::new(ClusterSettings::default());
    let create = Proposal::by("uid:7".into(), Command::create_user("ann"));
    let again = Proposal::by("uid:7".into(), Command::create_user("ann"));
    for (t, proposal) in [(1, create.clone()), (2, create), (3, again)] {
        reg.apply(&Request {
            at: at(t),
            proposals: vec![proposal].into(),
        });
    }
    let log: Vec<_> = reg.audit_since(Timestamp(0)).collect();
    // The retried id is not recorded twice; the second, refused create is.
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(
        (log[0].actor.as_str(), log[0].action.as_str()),
        ("uid:7", "create_user")
    );
    assert_eq!(log[0].result, "ok");
    assert!(log[1].result.contains("already exists"), "{log:?}");
    assert!(log[0].seq < log[1].seq);
    // Records survive the storage encoding.
    let restored = Registry::from_records(reg.all_records()).unwrap();
    assert_eq!(restored.audit_since(Timestamp(0)).count(), 2);
}

#[test]
fn audit_pruning_drops_by_age_then_by_count_and_survives_a_reload() {
    let mut reg = Registry::new(ClusterSettings::default());
    for i in 0..10 {
        run(
            &mut reg,
            i * 1000,
            Command::RecordAudit {
                actor: "a".into(),
                action: format!("act{i}"),
                target: String::new(),
                result: "ok".into(),
            },
        );
    }
    assert_eq!(reg.audit_extent().0, 10);
    // Older than t=3000 goes (three records), then the count cap keeps the newest five.
    run(
        &mut reg,
        20_000,
        Command::PruneAudit {
            before: at(3000),
            keep_at_most: 100,
        },
    );
    assert_eq!(reg.audit_extent(), (7, Some(at(3000))));
    run(
        &mut reg,
        21_000,
        Command::PruneAudit {
            before: at(0),
            keep_at_most: 5,
        },
    );
    let actions: Vec<String> = reg.audit_since(at(0)).map(|r| r.action.clone()).collect();
    assert_eq!(actions, ["act5", "act6", "act7", "act8", "act9"]);
    let loaded = Registry::from_records(reg.all_records()).unwrap();
    assert_eq!(loaded.audit_extent(), reg.audit_extent());
}

#[test]
fn member_derp_keys_are_pinned_replaced_and_stored() {
    let mut reg = Registry::new(ClusterSettings::default());
    assert_eq!(reg.member_derp_key(2), None);
    run(
        &mut reg,
        0,
        Command::SetMemberDerpKey {
            member: 2,
            key: key(7),
        },
    );
    run(
        &mut reg,
        1,
        Command::SetMemberDerpKey {
            member: 3,
            key: key(8),
        },
    );
    // A member whose data was wiped has a new key: it replaces the old one.
    run(
        &mut reg,
        2,
        Command::SetMemberDerpKey {
            member: 2,
            key: key(9),
        },
    );
    let loaded = Registry::from_records(reg.all_records()).unwrap();
    assert_eq!(loaded.member_derp_key(2), Some(&key(9)));
    assert_eq!(loaded.member_derp_key(3), Some(&key(8)));
}

/// A client's `RequestTags` are applied only where the policy's `tagOwners` name its user
/// (directly or through a group); other requested tags are ignored.
#[test]
fn requested_tags_need_an_owner_in_the_policy() {
    let mut f = fixture(true, None);
    run(
        &mut f.reg,
        2,
        Command::SetPolicy {
            policy: r#"{"groups": {"group:ops": ["alice@"]},
                "tagOwners": {"tag:web": ["alice@"], "tag:db": ["group:ops"], "tag:x": ["bob@"]}}"#
                .into(),
        },
    );
    let mut req = node_request(1, 1, "tagged");
    req.request_tags = vec![
        "tag:web".into(),
        "tag:db".into(),
        "tag:x".into(),
        "tag:nope".into(),
    ];
    let Outcome::Node(node) = register(&mut f, 3, req) else {
        panic!("registration refused")
    };
    assert_eq!(node.tags, ["tag:web", "tag:db"]);

    let mut untagged = node_request(2, 2, "plain");
    untagged.request_tags = vec!["tag:x".into()];
    let Outcome::Node(node) = register(&mut f, 4, untagged) else {
        panic!("registration refused")
    };
    assert!(
        node.tags.is_empty(),
        "bob owns tag:x, not alice: {:?}",
        node.tags
    );

    // Loaded from its records (a restart, or a snapshot), the registry knows the owners too.
    for records in [f.reg.all_records(), f.reg.snapshot_records()] {
        let mut loaded = Fixture {
            reg: Registry::from_records(records).unwrap(),
            key_full: f.key_full.clone(),
        };
        let mut again = node_request(3, 3, "again");
        again.request_tags = vec!["tag:web".into()];
        let Outcome::Node(node) = register(&mut loaded, 5, again) else {
            panic!("registration refused")
        };
        assert_eq!(node.tags, ["tag:web"]);
    }
}

/// Each accepted policy is kept as a version (the same text again is no change); a
/// rollback makes an old version run again as a new one; an unknown version is refused;
/// only the newest `POLICY_VERSIONS_MAX` are kept, and they survive a restart.
#[test]
fn policies_are_versioned_and_rolled_back() {
    let mut f = fixture(false, None);
    let set = |f: &mut Fixture, t: i64, p: &str| {
        run(&mut f.reg, t, Command::SetPolicy { policy: p.into() })
    };
    set(&mut f, 2, "{\"acls\": []}");
    set(&mut f, 3, "{\"acls\": []}");
    set(&mut f, 4, "{}");
    let versions: Vec<u64> = f.reg.policy_versions().map(|v| v.version).collect();
    assert_eq!(versions, [1, 2]);

    assert!(matches!(
        run(&mut f.reg, 5, Command::RollbackPolicy { version: 1 }),
        Outcome::Done
    ));
    assert_eq!(f.reg.policy(), "{\"acls\": []}");
    assert_eq!(f.reg.policy_versions().last().unwrap().version, 3);
    let before = f.reg.clone();
    assert!(matches!(
        run(&mut f.reg, 6, Command::RollbackPolicy { version: 99 }),
        Outcome::Rejected(Rejection::PolicyVersionNotFound(99))
    ));
    assert!(
        f.reg.same_entities(&before),
        "a refused rollback changes nothing"
    );

    for i in 0..super::POLICY_VERSIONS_MAX as i64 + 5 {
        set(
            &mut f,
            10 + i,
            &format!("{{\"hosts\": {{\"h{i}\": \"10.0.0.1\"}}}}"),
        );
    }
    let kept: Vec<u64> = f.reg.policy_versions().map(|v| v.version).collect();
    assert_eq!(kept.len(), super::POLICY_VERSIONS_MAX);
    assert_eq!(
        *kept.last().unwrap(),
        3 + super::POLICY_VERSIONS_MAX as u64 + 5
    );
    let reloaded = Registry::from_records(f.reg.all_records()).unwrap();
    assert!(reloaded.same_data(&f.reg));
    assert_eq!(reloaded.policy_versions().count(), kept.len());
}
