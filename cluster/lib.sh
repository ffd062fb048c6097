# Shared helpers for cluster/up, cluster/member and cluster/down. Sourced, not run.
# Member i (1-based) listens on 127.0.0.i with the default ports, so members look like
# separate hosts; data, config and log live in DIR/m<i>/.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
HSD="${HSD:-$TARGET_DIR/release/hsd}"
HSCTL="${HSCTL:-$(dirname "$HSD")/hsctl}"

die() { echo "cluster: $*" >&2; exit 1; }

need_binaries() {
  [ -x "$HSD" ] || die "no hsd at $HSD (build with: cargo build --release, or set HSD)"
  [ -x "$HSCTL" ] || die "no hsctl at $HSCTL (build with: cargo build --release, or set HSCTL)"
}

member_pid() { # DIR ID
  local f="$1/m$2/hsd.pid"
  [ -f "$f" ] && cat "$f"
}

member_alive() { # DIR ID
  local pid; pid="$(member_pid "$1" "$2")" || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

start_member() { # DIR ID
  local dir="$1" id="$2" m="$1/m$2"
  member_alive "$dir" "$id" && return 0
  rm -f "$m/ready.json"
  nohup "$HSD" --config "$m/config.yaml" --ready-file "$m/ready.json" >>"$m/hsd.log" 2>&1 &
  echo $! >"$m/hsd.pid"
}

wait_ready_file() { # DIR ID TIMEOUT_S
  local m="$1/m$2" deadline=$((SECONDS + $3))
  until [ -f "$m/ready.json" ]; do
    member_alive "$1" "$2" || die "member $2 exited; see $m/hsd.log: $(tail -n 3 "$m/hsd.log")"
    [ $SECONDS -lt $deadline ] || die "member $2 not ready after $3 s; see $m/hsd.log"
    sleep 0.2
  done
}

stop_member() { # DIR ID SIGNAL
  local pid; pid="$(member_pid "$1" "$2")" || return 0
  [ -n "$pid" ] || return 0
  kill "-$3" "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 60))
  while kill -0 "$pid" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { kill -KILL "$pid" 2>/dev/null || true; break; }
    sleep 0.1
  done
  rm -f "$1/m$2/hsd.pid" "$1/m$2/ready.json"
}

# Rewrites DIR/members.json from the members' config and pid files.
write_members_json() { # DIR
  python3 - "$1" <<'PY'
import json, os, sys
d = os.path.abspath(sys.argv[1])
n = json.load(open(os.path.join(d, "cluster.json")))["size"]
out = []
for i in range(1, n + 1):
    m = os.path.join(d, f"m{i}")
    pid = None
    try:
        pid = int(open(os.path.join(m, "hsd.pid")).read().strip())
        os.kill(pid, 0)
    except Exception:
        pid = None
    out.append({
        "id": i,
        "control_url": f"http://127.0.0.{i}:8080",
        "grpc_addr": f"127.0.0.{i}:50443",
        "cluster_addr": f"127.0.0.{i}:50444",
        "socket": os.path.join(m, "hsd.sock"),
        "pid": pid,
        "data_dir": m,
        "log": os.path.join(m, "hsd.log"),
    })
tmp = os.path.join(d, "members.json.tmp")
json.dump(out, open(tmp, "w"), indent=2)
os.replace(tmp, os.path.join(d, "members.json"))
PY
}

# Waits until some member reports a leader and every running member is healthy.
wait_healthy() { # DIR TIMEOUT_S
  local dir="$1" deadline=$((SECONDS + $2)) n
  n="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["size"])' "$dir/cluster.json")"
  while :; do
    for i in $(seq 1 "$n"); do
      member_alive "$dir" "$i" || continue
      if "$HSCTL" --socket "$dir/m$i/hsd.sock" --timeout 2s cluster status -o json 2>/dev/null \
        | python3 -c '
import json, sys
s = json.load(sys.stdin)
ok = s.get("leader") is not None and all(m.get("healthy") for m in s["members"])
sys.exit(0 if ok else 1)'; then
        return 0
      fi
    done
    [ $SECONDS -lt $deadline ] || die "no healthy cluster with a leader after $2 s"
    sleep 0.3
  done
}
