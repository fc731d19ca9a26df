#!/usr/bin/env bash
# Shared by scripts/up and scripts/test: installs and starts what tasklog needs on a
# Debian machine. Every step checks first, so running it twice is safe.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
APT_UPDATED=""

say() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }

# Whether something listens on 127.0.0.1:$1.
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

apt_install() {
    if [ -z "$APT_UPDATED" ]; then
        say "apt-get update"
        $SUDO apt-get update -qq
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

# The Rust toolchain and what librdkafka's bundled C build needs (with OpenSSL, for TLS
# and SASL/SCRAM; postgres-openssl links it too).
ensure_toolchain() {
    if ! command -v cargo >/dev/null 2>&1; then
        [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo is not installed: install Rust (https://rustup.rs), then run this again" >&2
        exit 1
    fi
    local missing=()
    command -v cc >/dev/null 2>&1 || missing+=(build-essential)
    command -v make >/dev/null 2>&1 || missing+=(make)
    command -v perl >/dev/null 2>&1 || missing+=(perl)
    command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
    dpkg -s zlib1g-dev >/dev/null 2>&1 || missing+=(zlib1g-dev)
    dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
    # scripts/kafka --tls-port makes the test broker's certificates with it.
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi
}

# Debian's PostgreSQL (15 on bookworm), running, with the tasklog role and database.
ensure_postgres() {
    if ! command -v pg_ctlcluster >/dev/null 2>&1; then
        apt_install postgresql postgresql-client
    fi
    local version
    version="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)"
    if [ -z "$version" ]; then
        echo "PostgreSQL is installed but has no cluster under /etc/postgresql" >&2
        exit 1
    fi
    if ! pg_lsclusters -h 2>/dev/null | awk -v v="$version" '$1 == v && $2 == "main" && $4 == "online" {found=1} END {exit !found}'; then
        say "starting PostgreSQL $version"
        $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start || $SUDO pg_ctlcluster "$version" main start
    fi
    for _ in $(seq 1 60); do
        pg_isready -q -h 127.0.0.1 -p 5432 && break
        sleep 0.5
    done
    pg_isready -q -h 127.0.0.1 -p 5432 || { echo "PostgreSQL does not answer on 127.0.0.1:5432" >&2; exit 1; }
    local psql_admin=(psql -v ON_ERROR_STOP=1 -qtA)
    if [ "$(id -u)" -eq 0 ] && id postgres >/dev/null 2>&1; then
        psql_admin=(runuser -u postgres -- psql -v ON_ERROR_STOP=1 -qtA)
    elif [ -n "$SUDO" ]; then
        psql_admin=(sudo -u postgres psql -v ON_ERROR_STOP=1 -qtA)
    fi
    "${psql_admin[@]}" -c "DO \$\$ BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tasklog') THEN
            CREATE ROLE tasklog LOGIN PASSWORD 'tasklog' CREATEDB;
        END IF; END \$\$;"
    if [ "$("${psql_admin[@]}" -c "SELECT 1 FROM pg_database WHERE datname = 'tasklog'")" != "1" ]; then
        "${psql_admin[@]}" -c "CREATE DATABASE tasklog OWNER tasklog"
    fi
}

# Java 17+ and Maven: scripts/kafka fetches Apache Kafka from Maven Central and runs it.
ensure_java() {
    local missing=()
    command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
    command -v mvn >/dev/null 2>&1 || missing+=(maven)
    if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi
}

# kcat: the tests publish with it exactly as the README shows outside producers doing.
ensure_kcat() {
    command -v kcat >/dev/null 2>&1 || apt_install kcat
}

# schemathesis (from PyPI, pinned) in a venv under target/: scripts/test fuzzes the REST
# API with it against a live server (tests/api_fuzz.rs). Exports TASKLOG_SCHEMATHESIS.
SCHEMATHESIS_VERSION=4.32.5
ensure_schemathesis() {
    local venv="$ROOT/target/schemathesis-venv"
    local st="$venv/bin/st"
    local constraints="$ROOT/tests/schemathesis-constraints.txt"
    # Reinstall when the pinned set changed (the venv keeps a copy of what it was built from).
    if [ ! -x "$st" ] || ! cmp -s "$constraints" "$venv/constraints.txt"; then
        local python
        python="$(command -v python3.11 || command -v python3 || true)"
        if [ -z "$python" ]; then apt_install python3 python3-venv; python="$(command -v python3)"; fi
        if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then apt_install python3-venv; fi
        say "pip install schemathesis==$SCHEMATHESIS_VERSION (into target/schemathesis-venv, every dependency pinned)"
        rm -rf "$venv"
        "$python" -m venv "$venv"
        "$venv/bin/pip" install -q --disable-pip-version-check -c "$constraints" "schemathesis==$SCHEMATHESIS_VERSION"
        cp "$constraints" "$venv/constraints.txt"
    fi
    export TASKLOG_SCHEMATHESIS="$st"
}

# Prometheus and promtool (Debian's `prometheus` package, 2.42 on bookworm): scripts/test
# checks and unit-tests docker/alerts.yml with promtool and runs a live Prometheus in
# tests/observability.rs; scripts/observe runs one for `tasklog up`. The package's own
# service (which would take port 9090 for a system-wide Prometheus) is kept from
# starting while installing (policy-rc.d) and disabled after: tasklog's scripts run
# Prometheus themselves, on 127.0.0.1 only. Without recommends: no node exporter.
# Exports TASKLOG_TEST_PROMETHEUS.
ensure_prometheus() {
    if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
        local policy=/usr/sbin/policy-rc.d placed=""
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\n# Placed by tasklog scripts/lib.sh while installing prometheus.\nexit 101\n' \
                | $SUDO tee "$policy" >/dev/null
            $SUDO chmod 755 "$policy"
            placed=1
        fi
        local ok=1
        apt_install --no-install-recommends prometheus || ok=""
        if [ -n "$placed" ]; then $SUDO rm -f "$policy"; fi
        [ -n "$ok" ] || { echo "installing prometheus failed" >&2; exit 1; }
        # Enabled for the next boot by the package: not ours to run.
        if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
            $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
        elif command -v update-rc.d >/dev/null 2>&1; then
            $SUDO update-rc.d prometheus disable >/dev/null 2>&1 || true
        fi
    fi
    TASKLOG_TEST_PROMETHEUS="$(command -v prometheus)"
    export TASKLOG_TEST_PROMETHEUS
}
