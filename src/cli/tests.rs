use clap::Parser;
use tonic::Code;

use super::*;
use crate::proto::admin as pb;

fn parse(args: &[&str]) -> Cli {
    Cli::try_parse_from(std::iter::once("hsctl").chain(args.iter().copied())).unwrap()
}

fn sample_node() -> pb::Node {
    pb::Node {
        id: 3,
        name: "laptop".into(),
        given_name: "laptop-1".into(),
        user: "alice".into(),
        ip_addresses: vec!["100.64.0.1".into(), "fd7a:115c:a1e0::1".into()],
        online: true,
        last_seen: None,
        expiry: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        tags: vec!["tag:web".into()],
        approved: true,
        member: Some(2),
        machine_key: "mkey:00".into(),
        node_key: "nodekey:00".into(),
        created_at: Some(prost_types::Timestamp {
            seconds: 1_600_000_000,
            nanos: 0,
        }),
        ephemeral: false,
        expired: false,
        user_id: 1,
        advertised_routes: vec![],
        approved_routes: vec![],
        primary_routes: vec![],
        disco_key: "discokey:00".into(),
        pre_auth_key_id: Some(1),
    }
}

#[test]
fn output_flag_is_accepted_before_and_after_the_subcommand() {
    assert_eq!(parse(&["-o", "json", "nodes", "list"]).output, Format::Json);
    assert_eq!(parse(&["nodes", "list", "-o", "yaml"]).output, Format::Yaml);
    assert_eq!(
        parse(&["nodes", "list", "--output", "json"]).output,
        Format::Json
    );
    assert_eq!(parse(&["users", "list"]).output, Format::Table);
}

#[test]
fn auth_register_is_an_alias_of_nodes_register() {
    let cli = parse(&["auth", "register", "--user", "alice", "--key", "abc"]);
    let Command::Auth(nodes::AuthCommand::Register(args)) = cli.command else {
        panic!("not auth register")
    };
    assert_eq!((args.user.as_str(), args.key.as_str()), ("alice", "abc"));
    let cli = parse(&["nodes", "register", "--user", "alice", "--key", "abc"]);
    assert!(matches!(
        cli.command,
        Command::Nodes(nodes::NodesCommand::Register(_))
    ));
}

#[test]
fn commands_parse_their_arguments() {
    let cli = parse(&[
        "preauthkeys",
        "create",
        "--user",
        "a",
        "--reusable",
        "--expiration",
        "2h",
        "--tags",
        "tag:a,tag:b",
    ]);
    let Command::Preauthkeys(keys::PreAuthKeysCommand::Create {
        user,
        reusable,
        ephemeral,
        expiration,
        tags,
    }) = cli.command
    else {
        panic!("not preauthkeys create")
    };
    assert_eq!(user, "a");
    assert!(reusable && !ephemeral);
    assert_eq!(
        expiration,
        Expiration(Some(std::time::Duration::from_secs(7200)))
    );
    assert_eq!(tags, ["tag:a", "tag:b"]);
    let cli = parse(&["preauthkeys", "expire", "--user", "a", "hskey-auth-x"]);
    assert!(matches!(
        cli.command,
        Command::Preauthkeys(keys::PreAuthKeysCommand::Expire { .. })
    ));
    let cli = parse(&["cluster", "transfer-leader"]);
    assert!(matches!(
        cli.command,
        Command::Cluster(cluster::ClusterCommand::TransferLeader { id: None })
    ));
    let cli = parse(&["cluster", "add", "4", "127.0.0.4:50444"]);
    assert_eq!(cli.address, None);
    let Command::Cluster(cluster::ClusterCommand::Add { id: 4, address, .. }) = cli.command else {
        panic!("not add")
    };
    assert_eq!(address, "127.0.0.4:50444");
    let cli = parse(&[
        "--timeout",
        "250ms",
        "apikeys",
        "create",
        "--expiration",
        "never",
    ]);
    assert_eq!(cli.timeout, std::time::Duration::from_millis(250));
    assert!(matches!(
        cli.command,
        Command::Apikeys(keys::ApiKeysCommand::Create {
            expiration: Expiration(None)
        })
    ));
}

#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    let err = Cli::try_parse_from(["hsctl", "nodes", "approve", "not-a-number"]).unwrap_err();
    assert_eq!(parse_error_code(&err), EXIT_USAGE);
    let err = Cli::try_parse_from(["hsctl", "bogus"]).unwrap_err();
    assert_eq!(parse_error_code(&err), EXIT_USAGE);
    let err = Cli::try_parse_from(["hsctl", "-o", "xml", "users", "list"]).unwrap_err();
    assert_eq!(parse_error_code(&err), EXIT_USAGE);
    let err = Cli::try_parse_from(["hsctl", "--help"]).unwrap_err();
    assert_eq!(parse_error_code(&err), EXIT_OK);
    let err = Cli::try_parse_from(["hsctl", "--version"]).unwrap_err();
    assert_eq!(parse_error_code(&err), EXIT_OK);
}

#[test]
fn grpc_statuses_map_to_exit_codes() {
    assert_eq!(exit_code(Code::Unavailable), EXIT_UNAVAILABLE);
    assert_eq!(exit_code(Code::DeadlineExceeded), EXIT_UNAVAILABLE);
    assert_eq!(exit_code(Code::ResourceExhausted), EXIT_UNAVAILABLE);
    assert_eq!(exit_code(Code::Unauthenticated), EXIT_NOPERM);
    assert_eq!(exit_code(Code::PermissionDenied), EXIT_NOPERM);
    assert_eq!(exit_code(Code::NotFound), EXIT_FAILURE);
    assert_eq!(exit_code(Code::AlreadyExists), EXIT_FAILURE);
    let err = CliError::from(tonic::Status::not_found("user \"bob\" not found"));
    assert_eq!(
        err,
        CliError {
            code: 1,
            message: "user \"bob\" not found".into()
        }
    );
}

#[test]
fn target_prefers_address_over_socket() {
    let cli = parse(&["--socket", "/tmp/x.sock", "users", "list"]);
    assert_eq!(cli.target(), Target::Socket("/tmp/x.sock".into()));
    let cli = parse(&[
        "users",
        "list",
        "--address",
        "127.0.0.1:50443",
        "--api-key",
        "k",
    ]);
    assert_eq!(
        cli.target(),
        Target::Address {
            address: "127.0.0.1:50443".into(),
            api_key: Some("k".into())
        }
    );
}

#[test]
fn node_json_has_the_promised_fields() {
    let v = nodes::node_json(&sample_node());
    for field in [
        "id",
        "name",
        "given_name",
        "user",
        "ip_addresses",
        "online",
        "last_seen",
        "expiry",
        "tags",
        "approved",
        "member",
        "ephemeral",
        "created_at",
    ] {
        assert!(v.get(field).is_some(), "missing {field}");
    }
    assert_eq!(v["id"], 3);
    assert_eq!(v["name"], "laptop");
    assert_eq!(v["user"], "alice");
    assert_eq!(
        v["ip_addresses"],
        serde_json::json!(["100.64.0.1", "fd7a:115c:a1e0::1"])
    );
    assert_eq!(v["online"], true);
    assert_eq!(v["last_seen"], serde_json::Value::Null);
    assert_eq!(v["expiry"], "2023-11-14T22:13:20Z");
    assert_eq!(v["member"], 2);
    let mut offline = sample_node();
    offline.member = None;
    assert_eq!(
        nodes::node_json(&offline)["member"],
        serde_json::Value::Null
    );
}

#[test]
fn node_table_is_aligned() {
    let text = nodes::nodes_table(&[sample_node()]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with("ID  NAME    GIVEN NAME  USER"));
    assert!(lines[1].starts_with("3   laptop  laptop-1    alice"));
    // Columns line up: every header starts where its cell starts.
    let col = lines[0].find("ONLINE").unwrap();
    assert_eq!(&lines[1][col..col + 3], "yes");
}

#[test]
fn cluster_status_json_shape() {
    let s = pb::ClusterStatusResponse {
        leader: None,
        term: 4,
        member_id: 1,
        members: vec![pb::Member {
            id: 1,
            name: "m1".into(),
            address: "127.0.0.1:50444".into(),
            role: pb::MemberRole::Follower as i32,
            healthy: true,
            last_applied: Some(9),
            match_index: None,
            version: Some("0.1.0".into()),
            clients: Some(2),
            control_url: "http://127.0.0.1:8080".into(),
            voter: true,
            draining: false,
        }],
    };
    let v = cluster::status_json(&s);
    assert_eq!(v["leader"], serde_json::Value::Null);
    assert_eq!(v["term"], 4);
    let m = &v["members"][0];
    assert_eq!(m["role"], "follower");
    assert_eq!(m["match_index"], serde_json::Value::Null);
    assert_eq!(m["last_applied"], 9);
    assert_eq!(m["clients"], 2);
    assert_eq!(m["healthy"], true);
    assert!(cluster::status_table(&s).starts_with("leader: none  term: 4"));
}

#[test]
fn expiration_parses_durations_and_never() {
    assert_eq!(
        "90d".parse::<Expiration>().unwrap(),
        Expiration(Some(std::time::Duration::from_secs(90 * 86400)))
    );
    assert_eq!("never".parse::<Expiration>().unwrap(), Expiration(None));
    assert!("soon".parse::<Expiration>().is_err());
    let at = Expiration(Some(std::time::Duration::from_secs(3600)))
        .to_timestamp()
        .unwrap();
    assert!(at.seconds > chrono::Utc::now().timestamp());
    assert!(
        Expiration(Some(std::time::Duration::MAX))
            .to_timestamp()
            .is_some()
    );
}

#[tokio::test]
async fn unreachable_socket_exits_69() {
    let cli = parse(&["--socket", "/nonexistent/hsd.sock", "users", "list"]);
    let err = execute(&cli).await.unwrap_err();
    assert_eq!(err.code, EXIT_UNAVAILABLE, "{err:?}");
}

/// clap's own consistency checks over every subcommand (duplicate names, conflicts with
/// the generated `--version`), which otherwise fail only when that subcommand runs.
#[test]
fn the_command_line_definition_is_consistent() {
    use clap::CommandFactory;
    Cli::command().debug_assert();
}
