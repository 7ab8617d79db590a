#!/usr/bin/env bash
# Installs everything kiln needs on a Debian 12 host, skipping what is already there.
# Called by `make serve` and, with --test (adds Chromium for the browser test), by `make test`;
# with --python-only (no system packages: `make unit`) it only makes the project venv.
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[install]\033[0m %s\n' "$*"; }
mode=${1:-}

need_apt=()
if [ "$mode" != "--python-only" ]; then
# (no `| grep -q` here: with pipefail, grep quitting early makes runsc die of SIGPIPE and fail the test)
runsc_ok() {
  command -v runsc >/dev/null || return 1
  local v
  v=$(runsc --version 2>/dev/null || true)
  [[ $v =~ runsc\ version\ (0\.0~)?(release-)?20(2[4-9]|[3-9][0-9]) ]]
}
runsc_ok || need_apt+=(runsc)
command -v mmdebstrap >/dev/null || need_apt+=(mmdebstrap)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v nft >/dev/null || need_apt+=(nftables)
command -v unshare >/dev/null || need_apt+=(util-linux)
command -v mkfs.ext4 >/dev/null || need_apt+=(e2fsprogs)
command -v curl >/dev/null || need_apt+=(curl)   # the README's examples; `make bench` compares the CLI with it
command -v skopeo >/dev/null || need_apt+=(skopeo)   # image import: docker-save and OCI archives to an OCI layout
command -v umoci >/dev/null || need_apt+=(umoci)     # image import: applies layers (whiteouts, safe paths)
command -v rsync >/dev/null || need_apt+=(rsync)     # save-image: copies a sandbox's tree, hard-linking its image's
command -v mkfs.xfs >/dev/null || need_apt+=(xfsprogs)  # `make bench`: forks on a loop-mounted XFS (reflink)
[ -x /usr/bin/python3 ] || need_apt+=(python3)       # the agent's runtime inside every sandbox
command -v gcc >/dev/null || need_apt+=(gcc)          # builds kiln-init, every sandbox's PID 1 (static) ...
dpkg -s libc6-dev >/dev/null 2>&1 || need_apt+=(libc6-dev)  # ... against the static libc
if [ "$mode" = "--test" ]; then
  command -v chromium >/dev/null || need_apt+=(chromium)   # driven by Playwright in tests/browser
  dpkg -s busybox-static >/dev/null 2>&1 || need_apt+=(busybox-static)  # the tests' image without python3
  command -v node >/dev/null || need_apt+=(nodejs)   # the E2B JS SDK's tests
  command -v npm >/dev/null || need_apt+=(npm)
  [ -f /etc/ssl/certs/ca-certificates.crt ] || need_apt+=(ca-certificates)  # the E2B TLS tests' system roots
fi

if [ ${#need_apt[@]} -gt 0 ]; then
  # runsc must come from bookworm-backports (the bookworm build is too old: ptrace only, no
  # --compression=none, broken coreutils). Add that suite for the mirror the machine already uses.
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror=$(grep -rhs '^URIs:' /etc/apt/sources.list.d/*.sources | grep -v security | head -n1 | awk '{print $2}')
    [ -n "$mirror" ] || mirror=$(grep -rhs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
                                  | grep bookworm | grep -v security | head -n1 | awk '{print $2}')
    if [ -z "$mirror" ]; then
      echo "no Debian package source is configured in /etc/apt (sources.list or sources.list.d):" >&2
      echo "kiln installs from the sources this machine already uses" >&2
      exit 1
    fi
    say "adding bookworm-backports from $mirror"
    echo "deb $mirror bookworm-backports main" > /etc/apt/sources.list.d/kiln-backports.list
  fi
  say "apt: installing ${need_apt[*]}"
  apt-get update -qq
  others=()
  for p in "${need_apt[@]}"; do [ "$p" = runsc ] || others+=("$p"); done
  if [ ${#others[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${others[@]}"
  fi
  if [[ " ${need_apt[*]} " == *" runsc "* ]]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t bookworm-backports runsc
  fi
fi
runsc_ok || { echo "runsc from bookworm-backports is required (runsc --version: $(runsc --version 2>&1 | head -1))" >&2; exit 1; }
fi

# Python dependencies into the project venv.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.kiln-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "pip: installing kiln and its dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
if [ "$mode" = "--test" ]; then
  # The other E2B SDKs the tests drive, each in a directory of its own (versions in versions.env), from
  # the package sources pip and npm are already configured with.
  source tests/integration/e2b_clients/versions.env
  old=.cache/e2b-py-$E2B_PY_OLD
  if ! "$old/bin/python" -c "import e2b, e2b_code_interpreter, pytest, yaml, pydantic, dnslib, xxhash" 2>/dev/null; then
    # the E2B tests run under it too: pytest and what the tests' daemon helpers import (kiln itself runs
    # on .venv's Python; its dependencies and this SDK's cannot share a venv)
    say "pip: e2b $E2B_PY_OLD into $old (the E2B tests' older Python SDK)"
    rm -rf "$old" && "$PY" -m venv "$old" && "$old/bin/pip" install -q "e2b==$E2B_PY_OLD" \
      "e2b-code-interpreter==$E2B_CI_OLD" pytest pyyaml pydantic dnslib xxhash
  fi
  js=.cache/e2b-js-$E2B_JS
  if [ ! -f "$js/node_modules/e2b/package.json" ]; then
    say "npm: e2b $E2B_JS into $js (the E2B tests' JS SDK)"
    rm -rf "$js" && mkdir -p "$js" && (cd "$js" && npm init -y >/dev/null && npm install -q --no-audit --no-fund "e2b@$E2B_JS")
  fi
fi
say "dependencies ready"
