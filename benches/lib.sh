# Shared by benches/load, benches/derp and benches/compare-etcd. Sourced, not run.
# bench_binary NAME: builds the bench target NAME and the binaries hsd and hsctl
#   (target/release); prints the bench binary's path.
# in_cluster N GEN ARGS...: in a new network namespace (loopback only), starts an N-member
#   cluster with cluster/up, creates a reusable pre-auth key, runs GEN --members-json F
#   --auth-key K ARGS..., and takes the cluster down. With HSD_BENCH_POLICY set, that
#   policy file is loaded first, and the clients are spread over HSD_BENCH_USERS users
#   (default 50; bench@ plus user1@…) so per-user rules such as autogroup:self see
#   tailnets shaped like real ones.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

bench_binary() { # NAME
  # One build: a bench target makes cargo build the package's binaries too (for
  # CARGO_BIN_EXE_*), with the same features, into target/release. A separate
  # `cargo build --release` resolves features without the dev-dependencies, so on a fresh
  # machine it compiled every dependency (rocksdb too) a second time.
  echo "==> building (release, bench profile; the first build on a machine takes a while)" >&2
  (cd "$ROOT" && cargo bench --locked --bench "$1" --no-run --message-format=json-render-diagnostics) \
    | python3 -c 'import json,sys
name = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == name and m.get("executable"):
        print(m["executable"])' "$1"
}

in_cluster() { # N GEN ARGS...
  local members="$1" gen="$2"; shift 2
  [ -x "$gen" ] || { echo "bench: no generator binary" >&2; return 1; }
  local work; work="$(mktemp -d /tmp/hsd-bench.XXXXXX)"
  local ns; if [ "$(id -u)" = 0 ]; then ns=(unshare --net); else ns=(unshare --user --map-root-user --net); fi
  local status=0
  "${ns[@]}" -- bash -s "$ROOT" "$work" "$members" "$gen" "$@" <<'INNER' || status=$?
set -euo pipefail
ROOT="$1"; work="$2"; members="$3"; gen="$4"; shift 4
ip link set lo up
ulimit -n "$(ulimit -Hn)"   # one socket per simulated client
dir="$work/cluster"
# Every simulated client comes from one loopback address: lift the per-source limits. And
# all clients shake hands first, then register in turn: a large run keeps connections
# waiting longer than the idle timeout, which real clients never do.
export HSD_EXTRA_YAML="limits: {registrations_per_minute: 0, max_connections_per_source: 0, derp_connects_per_minute: 0, idle_timeout: 0}"
trap '"$ROOT/cluster/down" "$dir" >/dev/null 2>&1 || true' EXIT
"$ROOT/cluster/up" "$members" "$dir" >&2
hsd="${HSD:-$CARGO_TARGET_DIR/release/hsd}"
hsctl="${HSCTL:-$(dirname "$hsd")/hsctl}"
sock="$dir/m1/hsd.sock"
"$hsctl" --socket "$sock" users create bench -o json >/dev/null
if [ -n "${HSD_BENCH_POLICY:-}" ]; then
  "$hsctl" --socket "$sock" policy set --file "$HSD_BENCH_POLICY" >&2
fi
key="$("$hsctl" --socket "$sock" preauthkeys create --user bench --reusable -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')"
if [ -n "${HSD_BENCH_POLICY:-}" ]; then
  for u in $(seq 1 $(( ${HSD_BENCH_USERS:-50} - 1 ))); do
    "$hsctl" --socket "$sock" users create "user$u" -o json >/dev/null
    key="$key,$("$hsctl" --socket "$sock" preauthkeys create --user "user$u" --reusable -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')"
  done
fi
"$gen" --members-json "$dir/members.json" --auth-key "$key" "$@"
INNER
  # Member logs stay for a look when a run fails (or with HSD_BENCH_KEEP=1).
  if [ "$status" = 0 ] && [ "${HSD_BENCH_KEEP:-0}" != 1 ]; then rm -rf "$work"; else echo "bench: logs kept in $work" >&2; fi
  return "$status"
}
