#!/usr/bin/env bash
# Prepare a Debian 12 machine (as root) to run toe and its tests: the Debian
# packages the tests drive, then a virtualenv at .venv with toe installed in
# it (editable: the shim and the daemon's cffi module are built in place, so
# the checkout, the tests and .venv/bin/toe all run the same code).
# Idempotent: installs only what is missing; re-running rebuilds toe.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    curl netcat-openbsd iproute2 iputils-ping tcpdump nftables
    python3-venv python3-dev gcc libc6-dev binutils
    iperf3 sockperf nginx redis-server redis-tools
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup.sh: needs root to install: ${missing[*]}" >&2
        exit 1
    fi
    echo "setup.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
if ! .venv/bin/python -c 'import sys' >/dev/null 2>&1; then
    rm -rf .venv
    "$PYTHON" -m venv .venv
fi
# A hand-built copy of the cffi module with the interpreter's own tag would be
# imported instead of the abi3 one pip builds: remove it so the fresh build counts.
rm -f offload_daemon/_toe_abi.cpython-*.so
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,bench]'
echo "setup.sh: ready: $(.venv/bin/python --version), toe at .venv/bin/toe"
