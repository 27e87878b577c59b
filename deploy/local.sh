#!/usr/bin/env bash
# deploy/local.sh: run allot and its services on this machine, without systemd or docker.
#
#   deploy/local.sh up        install what is missing, start private PostgreSQL, Redis and
#                             RabbitMQ, build, start allot-api and allot-worker (127.0.0.1:8080)
#   deploy/local.sh test      the same services, then fmt, clippy, every test, the functional
#                             test, the tool tests, the benchmark's smoke run, the chaos test
#   deploy/local.sh bench [--smoke] [bench flags]
#   deploy/local.sh chaos [--long] [--cluster]   the chaos test alone, on services of its own
#   deploy/local.sh services | status | env | down | rabbitmqctl ARGS... | help
#
# This script does only what belongs in shell: it checks for root, installs the Debian packages
# that are missing (apt-get), finds cargo, builds, raises the open-files limit, and hands over
# to xtask (tests/src/bin/xtask), the Rust program that holds the port map and runs allot's
# processes and the test, bench and chaos pipeline. xtask starts and stops the services as
# their users through deploy/services.sh. Nothing calls back into this script.
#
# ALLOT_LOCAL_STATE (default .allot) and ALLOT_LOCAL_PORT_OFFSET (default 0) choose the copy, so
# that several run side by side; see `deploy/local.sh help`.
# ALLOT_LOCAL_RABBITMQ_NODES=3 runs a cluster of three RabbitMQ nodes instead of one (and `up`
# two API instances and three workers); xtask starts and joins the nodes (README, Cluster mode).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_BIN=/usr/lib/postgresql/15/bin

# Messages go to stderr: stdout may be read (`eval "$(deploy/local.sh env)"`).
log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

require_root() {
  [[ $EUID -eq 0 ]] || die "run me as root (I start the servers as the postgres, redis and rabbitmq users)"
}

# The functional test opens thousands of sockets. Some sandboxes cap the hard limit below 65536
# and refuse to raise it even for root: then take the hard limit, and say so.
raise_fd_limit() {
  ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
  local limit
  limit=$(ulimit -n)
  [[ $limit == unlimited ]] || ((limit >= 65536)) ||
    warn "open-files limit is $limit (the hard limit here), not 65536"
}

APT_UPDATED=false

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  # Another apt run may hold the lock (e.g. a background install): wait for it.
  local apt=(apt-get -o DPkg::Lock::Timeout=600 -y -q)
  if [[ $APT_UPDATED == false ]]; then
    "${apt[@]}" update </dev/null >&2
    APT_UPDATED=true
  fi
  "${apt[@]}" install --no-install-recommends "$@" </dev/null >&2
}

# True when Debian package $1 is installed and its program $2 is there.
have_package() {
  [[ -x $2 ]] && [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
}

# The services (and curl).
ensure_service_packages() {
  local missing=()
  have_package curl /usr/bin/curl || missing+=(curl)
  have_package redis-server /usr/bin/redis-server || missing+=(redis-server)
  have_package postgresql-15 "$PG_BIN/postgres" || missing+=(postgresql)
  have_package rabbitmq-server /usr/sbin/rabbitmq-server || missing+=(rabbitmq-server)
  ((${#missing[@]} == 0)) && return 0
  log "installing ${missing[*]}"
  apt_install "${missing[@]}"
  [[ -x $PG_BIN/postgres ]] || die "PostgreSQL 15 is not at $PG_BIN after installing postgresql"
}

# What the tool tests of `test` need from Debian: Node (when none is installed), Python's venv,
# Chromium.
ensure_tool_packages() {
  local missing=()
  command -v npm >/dev/null || missing+=(nodejs npm)
  python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
  have_package chromium /usr/bin/chromium || missing+=(chromium)
  ((${#missing[@]} == 0)) && return 0
  log "installing ${missing[*]}"
  apt_install "${missing[@]}"
}

ensure_cargo() {
  command -v cargo >/dev/null && return 0
  [[ -x $HOME/.cargo/bin/cargo ]] && PATH=$HOME/.cargo/bin:$PATH && return 0
  die "cargo not found (install Rust with rustup)"
}

# Where cargo puts binaries: honours CARGO_TARGET_DIR (relative to the repository root).
target_dir() {
  local dir=${CARGO_TARGET_DIR:-target}
  [[ $dir == /* ]] || dir=$ROOT/$dir
  printf '%s\n' "$dir"
}

# The release binaries of allot and of its tests and tools (xtask, functional-test, bench,
# chaos-test), built once: everything after runs them, as production would (a debug allot on
# 2 cores is several times slower, and a burst of 5,000 requests then overran the 1 s Redis
# timeout and was refused with 503s that say more about the build than about allot).
build_release() {
  log "building release binaries"
  (cd "$ROOT" && cargo build --release --bins -p allot-api -p allot-worker -p allot-tests >&2)
  XTASK=$(target_dir)/release/xtask
}

# xtask alone, for the commands that need no allot binary (a debug build: quick in a
# developer's warm target). Should the build fail, an xtask built before still stops things.
build_xtask() {
  if (cd "$ROOT" && cargo build --quiet -p allot-tests --bin xtask >&2); then
    XTASK=$(target_dir)/debug/xtask
    return 0
  fi
  local built
  for built in "$(target_dir)/debug/xtask" "$(target_dir)/release/xtask"; do
    if [[ -x $built ]]; then
      warn "the build failed; using the xtask built before ($built)"
      XTASK=$built
      return 0
    fi
  done
  die "the build failed, and no xtask was built before"
}

# A CI run builds once from a fresh clone: incremental caches would only take disk (3.7 GB of
# the debug build's 7 GB; one CI run failed with "No space left on device").
ci_build_settings() {
  [[ ${CI:-} == true ]] || return 0
  export CARGO_INCREMENTAL=0
  local free_kb
  free_kb=$(df -Pk "$ROOT" | awk 'NR == 2 { print $4 }')
  log "free disk: $((free_kb / 1024 / 1024)) GB (the build and the test run need about 8 GB)"
  ((free_kb >= 8 * 1024 * 1024)) || warn "less than 8 GB free on $ROOT: the build may run out of disk"
}

main() {
  local command=${1:-help}
  export ALLOT_REPO=$ROOT
  ci_build_settings
  case $command in
    up | bench | test | chaos)
      require_root
      raise_fd_limit
      ensure_service_packages
      [[ $command != test ]] || ensure_tool_packages
      ensure_cargo
      build_release
      ;;
    services | down | rabbitmqctl)
      require_root
      ensure_service_packages
      ensure_cargo
      build_xtask
      ;;
    status | env | help | -h | --help)
      ensure_cargo
      build_xtask
      ;;
    *)
      ensure_cargo
      build_xtask
      "$XTASK" help >&2
      exit 2
      ;;
  esac
  exec "$XTASK" "$@"
}

main "$@"
