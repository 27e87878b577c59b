#!/usr/bin/env bash
# deploy/local.sh: run allot and its services on this machine, without systemd or docker.
#
#   deploy/local.sh services   install (if missing) and start private PostgreSQL, Redis, RabbitMQ
#   deploy/local.sh up         services + release build + start allot-api and allot-worker
#   deploy/local.sh test       services + fmt + clippy + tests + functional test on a fresh system,
#                              then newman, schemathesis and a headless-browser test, a benchmark
#                              smoke run, and the chaos test (short form) on services of its own
#   deploy/local.sh bench      services + release build + the benchmark on a fresh allot
#                              (`bench --smoke`: the tiny form that `test` runs)
#   deploy/local.sh status     show what runs
#   deploy/local.sh down       stop everything this script started
#   deploy/local.sh start-service|stop-service|kill-service postgres|redis|rabbitmq
#                              one service, for fault injection (the chaos test)
#
# Everything lives under $ROOT/.allot/ (ignored by git): data, logs, pid files. The services are
# private instances on loopback ports of their own, so they never touch a system-wide server.
#
# Two variables let several independent copies run side by side on one machine (the chaos test
# uses this to own services it can stop and kill):
#   ALLOT_LOCAL_STATE        state folder (default $ROOT/.allot)
#   ALLOT_LOCAL_PORT_OFFSET  added to every port below (default 0); a non-zero offset also gives
#                            the RabbitMQ node its own name
# Processes are found through our own pid files only; nothing is ever killed by name.
# Must run as root (it starts the servers as the postgres, redis and rabbitmq users).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${ALLOT_LOCAL_STATE:-$ROOT/.allot}
mkdir -p "$STATE" && STATE=$(cd "$STATE" && pwd)  # absolute: the services run from elsewhere
OFFSET=${ALLOT_LOCAL_PORT_OFFSET:-0}
[[ $OFFSET =~ ^[0-9]+$ ]] && ((OFFSET < 9000)) || {
  echo "error: ALLOT_LOCAL_PORT_OFFSET must be a number below 9000" >&2
  exit 2
}
RUN_DIR=$STATE/run   # pid files of the processes this script starts itself
LOG_DIR=$STATE/logs  # logs of allot's processes and of the start commands

PG_BIN=/usr/lib/postgresql/15/bin
PG_PORT=$((55432 + OFFSET))
PG_DIR=$STATE/pg     # owned by postgres: data/, postgres.log and the unix socket
PG_DATA=$PG_DIR/data
PG_LOG=$PG_DIR/postgres.log

REDIS_PORT=$((56379 + OFFSET))
REDIS_DIR=$STATE/redis  # owned by redis: append-only files, redis.pid, redis.log
REDIS_PID_FILE=$REDIS_DIR/redis.pid

RMQ_NODE=allot@localhost
((OFFSET == 0)) || RMQ_NODE=allot-$OFFSET@localhost
RMQ_PORT=$((55672 + OFFSET))       # AMQP
RMQ_DIST_PORT=$((55673 + OFFSET))  # Erlang distribution (the default, AMQP port + 20000, is not a valid port)
RMQ_EPMD_PORT=$((55674 + OFFSET))  # our own epmd, so that `down` can stop it without touching anybody else's
RMQ_DIR=$STATE/rabbitmq  # owned by rabbitmq: mnesia/, log/, config files, rabbitmq.pid
RMQ_PID_FILE=$RMQ_DIR/rabbitmq.pid
EPMD_PID_FILE=$RUN_DIR/epmd.pid

API_ADDR=127.0.0.1:$((8080 + OFFSET))
# The chaos test's own copy of the services (it stops and kills them): a state folder inside
# ours and ports 6000 above ours, unless set. 6000 puts its PostgreSQL, Redis and RabbitMQ
# ports (61432 and up) above Linux's ephemeral port range (32768-60999): it restarts them
# often, and a port inside that range is now and then held for a moment by somebody's
# outgoing connection, which makes the restart fail with "address already in use".
CHAOS_STATE=${ALLOT_CHAOS_STATE:-$STATE/chaos}
CHAOS_OFFSET=${ALLOT_CHAOS_PORT_OFFSET:-$((OFFSET + 6000))}
WORKER_ADDR=127.0.0.1:$((8081 + OFFSET))             # the worker's /healthz, /readyz, /metrics
FUNCTIONAL_ADDR=127.0.0.1:$((18080 + OFFSET))
FUNCTIONAL_WORKER_ADDR=127.0.0.1:$((18081 + OFFSET))
BENCH_ADDR=127.0.0.1:$((28080 + OFFSET))
BENCH_WORKER_ADDR=127.0.0.1:$((28081 + OFFSET))
BENCH_REFERENCE_ADDR=127.0.0.1:$((29080 + OFFSET))
ADMIN_TOKEN_FILE=$STATE/admin-token
VENV=$STATE/venv                 # Python tools of `test` (schemathesis, PyYAML)
ARTIFACTS=$STATE/artifacts       # what `test` keeps for people to look at (screenshots)
BROWSER_TESTS=$ROOT/tests/browser

# The environment every RabbitMQ command (server and CLI) gets, so that they all talk to the
# private node. rabbitmq-server and rabbitmqctl switch to the rabbitmq user through `su`, which
# keeps these variables.
RMQ_ENV=(
  "RABBITMQ_NODENAME=$RMQ_NODE"
  "RABBITMQ_MNESIA_BASE=$RMQ_DIR/mnesia"
  "RABBITMQ_LOG_BASE=$RMQ_DIR/log"
  "RABBITMQ_CONFIG_FILE=$RMQ_DIR/rabbitmq.conf"
  "RABBITMQ_ADVANCED_CONFIG_FILE=$RMQ_DIR/advanced.config"
  "RABBITMQ_CONF_ENV_FILE=$RMQ_DIR/rabbitmq-env.conf"
  "RABBITMQ_ENABLED_PLUGINS_FILE=$RMQ_DIR/enabled_plugins"
  "RABBITMQ_PID_FILE=$RMQ_PID_FILE"
  "RABBITMQ_DIST_PORT=$RMQ_DIST_PORT"
  "ERL_EPMD_PORT=$RMQ_EPMD_PORT"
  "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}"
)

# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

log() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

require_root() {
  [[ $EUID -eq 0 ]] || die "run me as root (I start the servers as the postgres, redis and rabbitmq users)"
}

# The functional test opens thousands of sockets. Some sandboxes cap the hard limit below
# 65536 and refuse to raise it even for root: then take the hard limit (see fd_limit_note).
raise_fd_limit() {
  ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
}

fd_limit_note() {
  local limit
  limit=$(ulimit -n)
  [[ $limit == unlimited ]] || ((limit >= 65536)) ||
    warn "open-files limit is $limit (the hard limit here), not 65536"
}

# Poll "$@" every half second until it succeeds; fail after $1 seconds.
wait_until() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
  timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# Refuse to start a service on a port that something else (not ours) already holds.
require_free_port() {
  local port=$1 what=$2
  ! port_open "$port" || die "127.0.0.1:$port is taken by a process that is not ours; cannot start $what"
}

# Print the pid stored in file $1 (first line), or fail if there is none.
read_pid() {
  local pid
  [[ -r $1 ]] || return 1
  read -r pid <"$1" || [[ -n ${pid:-} ]] || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  printf '%s\n' "$pid"
}

# True when process $1 exists, is not a zombie, and its command name is $2.
pid_alive() {
  local pid=$1 comm=$2 name stat
  read -r name 2>/dev/null <"/proc/$pid/comm" && [[ $name == "$comm" ]] || return 1
  read -r stat 2>/dev/null <"/proc/$pid/stat" || return 1
  stat=${stat##*) }  # the fields after "pid (comm) "; the first is the state
  [[ ${stat%% *} != Z ]]
}

pid_gone() { ! pid_alive "$1" "$2"; }

# Print the pid from pid file $1 if that process is alive and named $2.
live_pid() {
  local pid
  pid=$(read_pid "$1") && pid_alive "$pid" "$2" && printf '%s\n' "$pid"
}

# TERM process $1 (named $2), wait up to $3 seconds, then KILL it.
stop_pid() {
  local pid=$1 comm=$2 grace=$3
  kill -TERM "$pid" 2>/dev/null || return 0
  wait_until "$grace" pid_gone "$pid" "$comm" && return 0
  warn "$comm (pid $pid) still runs after ${grace}s; sending KILL"
  kill -KILL "$pid" 2>/dev/null || true
  wait_until 5 pid_gone "$pid" "$comm"
}

# Let user $1 reach directory $2: every folder from $2 up to / needs search (x) permission for
# that user. The repository may sit under a root-owned folder; add o+x where it is missing.
ensure_traversable() {
  local user=$1 target=$2 dir=$2 chain=() i
  while [[ $dir != / ]]; do
    chain=("$dir" "${chain[@]}")
    dir=$(dirname "$dir")
  done
  for i in "${chain[@]}"; do  # from the top down, so each test sees its parents fixed
    runuser -u "$user" -- test -x "$i" && continue
    log "chmod o+x $i (so that $user can reach $target)"
    chmod o+x "$i"
  done
}

# Create directories "${@:2}" owned by user $1 (the owner only, not recursively).
make_owned_dirs() {
  local user=$1
  shift
  mkdir -p "$@"
  chown "$user:$user" "$@"
}

make_state_dirs() {
  mkdir -p "$STATE" "$RUN_DIR" "$LOG_DIR"
}

# Print the last lines of each log file given, for a failure report.
show_logs() {
  local file
  for file in "$@"; do
    [[ -f $file ]] || continue
    printf '\n----- last lines of %s -----\n' "$file" >&2
    tail -n 40 "$file" >&2
  done
}

random_token() {
  printf '%s\n' "$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
}

# ---------------------------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------------------------

APT_UPDATED=false

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  # Another apt run may hold the lock (e.g. a background install): wait for it.
  local apt=(apt-get -o DPkg::Lock::Timeout=600 -y -q)
  if [[ $APT_UPDATED == false ]]; then
    "${apt[@]}" update </dev/null
    APT_UPDATED=true
  fi
  "${apt[@]}" install --no-install-recommends "$@" </dev/null
}

# True when Debian package $1 is installed and its program $2 is there.
have_package() {
  [[ -x $2 ]] && [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
}

ensure_packages() {
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

# ---------------------------------------------------------------------------------------------
# PostgreSQL 15 on 127.0.0.1:55432, data in .allot/pg/data, trust authentication
# ---------------------------------------------------------------------------------------------

as_postgres() { runuser -u postgres -- "$@"; }

pg_pid() { live_pid "$PG_DATA/postmaster.pid" postgres; }

pg_answers() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; }

# psql as the postgres superuser over TCP, stopping at the first error.
pg_sql() {
  PGOPTIONS="-c client_min_messages=warning" "$PG_BIN/psql" -X -q -t -A -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres "$@" </dev/null
}

# The unix socket goes into .allot/pg unless that path is too long for a socket (107 bytes);
# allot only uses TCP, so then the socket is simply left out.
pg_socket_dir() {
  local socket=$PG_DIR/.s.PGSQL.$PG_PORT
  if ((${#socket} > 107)); then
    warn "$PG_DIR is too long a path for a unix socket; PostgreSQL listens on TCP only"
    return 0
  fi
  printf '%s\n' "$PG_DIR"
}

pg_init() {
  [[ -s $PG_DATA/PG_VERSION ]] && return 0
  log "initialising PostgreSQL data in $PG_DATA"
  as_postgres "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
    >"$LOG_DIR/postgres-initdb.log" 2>&1 || {
    show_logs "$LOG_DIR/postgres-initdb.log"
    die "initdb failed"
  }
}

pg_launch() {
  local options
  options="-p $PG_PORT -c listen_addresses=127.0.0.1 -c max_connections=400"
  options+=" -c unix_socket_directories='$(pg_socket_dir)'"
  as_postgres "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -o "$options" -w -t 60 start >/dev/null || {
    show_logs "$PG_LOG"
    die "PostgreSQL did not start"
  }
}

start_postgres() {
  local pid
  if pid=$(pg_pid); then
    log "PostgreSQL already running (pid $pid) on 127.0.0.1:$PG_PORT"
  else
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
    require_free_port "$PG_PORT" PostgreSQL
    ensure_traversable postgres "$STATE"
    make_owned_dirs postgres "$PG_DIR"
    pg_init
    pg_launch
  fi
  wait_until 60 pg_answers || die "PostgreSQL does not answer on 127.0.0.1:$PG_PORT (see $PG_LOG)"
}

stop_postgres() {
  pg_pid >/dev/null || return 0
  log "stopping PostgreSQL"
  as_postgres "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null
}

# Create database $1 unless it exists.
ensure_database() {
  [[ $(pg_sql -c "select 1 from pg_database where datname = '$1'") == 1 ]] && return 0
  log "creating database $1"
  pg_sql -c "create database \"$1\""
}

# Drop database $1 (disconnecting its sessions) and create it empty.
recreate_database() {
  log "recreating database $1"
  pg_sql -c "drop database if exists \"$1\" with (force)" -c "create database \"$1\""
}

# ---------------------------------------------------------------------------------------------
# Redis on 127.0.0.1:56379, append-only file in .allot/redis
# ---------------------------------------------------------------------------------------------

redis_cli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@" </dev/null; }

redis_pid() { live_pid "$REDIS_PID_FILE" redis-server; }

redis_answers() { [[ $(redis_cli ping 2>/dev/null) == PONG ]]; }

# --save '': no RDB snapshots on top of the append-only file (they would only add forks).
redis_launch() {
  runuser -u redis -- redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" \
    --dir "$REDIS_DIR" --pidfile "$REDIS_PID_FILE" --logfile "$REDIS_DIR/redis.log" \
    --appendonly yes --appendfsync everysec --save '' </dev/null
}

start_redis() {
  local pid
  if pid=$(redis_pid); then
    log "Redis already running (pid $pid) on 127.0.0.1:$REDIS_PORT"
  else
    log "starting Redis on 127.0.0.1:$REDIS_PORT"
    require_free_port "$REDIS_PORT" Redis
    ensure_traversable redis "$STATE"
    make_owned_dirs redis "$REDIS_DIR"
    redis_launch
  fi
  wait_until 30 redis_answers || {
    show_logs "$REDIS_DIR/redis.log"
    die "Redis does not answer PING on 127.0.0.1:$REDIS_PORT"
  }
}

stop_redis() {
  local pid
  pid=$(redis_pid) || return 0
  log "stopping Redis (pid $pid)"
  stop_pid "$pid" redis-server 30
}

# ---------------------------------------------------------------------------------------------
# RabbitMQ: a private node allot@localhost, AMQP on 127.0.0.1:55672, its own epmd on 55674
# ---------------------------------------------------------------------------------------------

# rabbitmqctl against our node, with the same environment as the server. Never call the bare
# rabbitmqctl for this node: without ERL_EPMD_PORT it looks for the node in (and starts) the
# system-wide epmd on port 4369. Call it only while the node runs, or it starts an epmd itself.
rmqctl() {
  env "${RMQ_ENV[@]}" timeout 120 /usr/sbin/rabbitmqctl -n "$RMQ_NODE" "$@" </dev/null
}

rmq_pid() { live_pid "$RMQ_PID_FILE" beam.smp; }


rmq_answers() { port_open "$RMQ_PORT" && rmqctl -q status >/dev/null 2>&1; }

rmq_write_config() {
  printf '%s\n' \
    "# generated by deploy/local.sh" \
    "listeners.tcp.local = 127.0.0.1:$RMQ_PORT" >"$RMQ_DIR/rabbitmq.conf"
  printf '[].\n' >"$RMQ_DIR/enabled_plugins"
  : >"$RMQ_DIR/rabbitmq-env.conf"  # keeps /etc/rabbitmq/rabbitmq-env.conf out
}

# epmd, the Erlang name server, on a port of its own. If none answers there, the node (or
# rabbitmqctl) starts one by itself, daemonised, without a pid file. So whatever epmd answers on
# our private port is the one our node uses: reuse it, and stop it through epmd's own -kill.
epmd_answers() { epmd -port "$RMQ_EPMD_PORT" -names >/dev/null 2>&1; }

start_epmd() {
  epmd_answers && return 0
  require_free_port "$RMQ_EPMD_PORT" epmd
  nohup setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
    epmd -address 127.0.0.1 -port "$RMQ_EPMD_PORT" >>"$LOG_DIR/epmd.log" 2>&1 </dev/null &
  echo "$!" >"$EPMD_PID_FILE"
  # 30 s: on a loaded machine (other builds running) epmd can take a while to answer.
  wait_until 30 epmd_answers || die "epmd did not start on 127.0.0.1:$RMQ_EPMD_PORT"
}

rmq_launch() {
  ensure_traversable rabbitmq "$STATE"
  make_owned_dirs rabbitmq "$RMQ_DIR" "$RMQ_DIR/mnesia" "$RMQ_DIR/log"
  rmq_write_config
  start_epmd
  # Not through /usr/sbin/rabbitmq-server: that wrapper switches user with `su`, which resets
  # the open-files limit to 1024. RabbitMQ sizes its file-handle budget from that limit, and with
  # a few hundred quorum queues it then stops serving new connections. setpriv keeps our limit.
  env "${RMQ_ENV[@]}" HOME=/var/lib/rabbitmq \
    setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
    /usr/lib/rabbitmq/bin/rabbitmq-server -detached >>"$LOG_DIR/rabbitmq-start.log" 2>&1 </dev/null
}

start_rabbitmq() {
  local pid
  if pid=$(rmq_pid); then
    log "RabbitMQ already running (pid $pid) on 127.0.0.1:$RMQ_PORT"
  else
    log "starting RabbitMQ node $RMQ_NODE on 127.0.0.1:$RMQ_PORT"
    require_free_port "$RMQ_PORT" RabbitMQ
    rmq_launch
  fi
  wait_until 90 rmq_answers || {
    show_logs "$LOG_DIR/rabbitmq-start.log" "$RMQ_DIR/log/$RMQ_NODE.log"
    die "RabbitMQ did not come up on 127.0.0.1:$RMQ_PORT within 90 s"
  }
}

stop_rabbitmq() {
  local pid
  if pid=$(rmq_pid); then
    log "stopping RabbitMQ (pid $pid)"
    # `stop <pid file>` returns once the node's process has exited.
    rmqctl -q stop "$RMQ_PID_FILE" >/dev/null 2>&1 || true
    stop_pid "$pid" beam.smp 30
  fi
  stop_epmd
}

# Stops the epmd on our private port once no node is registered with it any more.
stop_epmd() {
  rm -f "$EPMD_PID_FILE"
  epmd_answers || return 0
  if epmd -port "$RMQ_EPMD_PORT" -names 2>/dev/null | grep -q '^name '; then
    warn "epmd on 127.0.0.1:$RMQ_EPMD_PORT still has nodes registered; leaving it running"
    return 0
  fi
  log "stopping epmd on 127.0.0.1:$RMQ_EPMD_PORT"
  epmd -port "$RMQ_EPMD_PORT" -kill >/dev/null 2>&1 || true
  wait_until 10 epmd_gone || warn "epmd on 127.0.0.1:$RMQ_EPMD_PORT did not stop"
}

epmd_gone() { ! epmd_answers; }

# Delete virtual host $1 if it exists, create it, and give guest every permission on it.
recreate_vhost() {
  local vhost=$1 vhosts
  log "recreating RabbitMQ vhost $vhost"
  vhosts=$(rmqctl -q list_vhosts name)
  if grep -qxF "$vhost" <<<"$vhosts"; then
    rmqctl -q delete_vhost "$vhost" >/dev/null
  fi
  rmqctl -q add_vhost "$vhost" >/dev/null
  rmqctl -q set_permissions -p "$vhost" guest '.*' '.*' '.*' >/dev/null
}

# ---------------------------------------------------------------------------------------------
# allot's own processes (allot-api, allot-worker), one pid file each in .allot/run
# ---------------------------------------------------------------------------------------------

# chaos-*: the processes the chaos test spawns itself (it writes their pid files), so that
# `down` on the chaos copy stops them even if the chaos test died.
APPS=(api worker functional-api functional-worker bench-api bench-worker chaos-api chaos-a-worker
  chaos-b-worker)

app_pid_file() { printf '%s\n' "$RUN_DIR/$1.pid"; }

app_log() { printf '%s\n' "$LOG_DIR/$1.log"; }

# The process name: allot-api for api and functional-api, allot-worker for the workers.
app_comm() { printf 'allot-%s\n' "${1##*-}"; }

app_pid() { live_pid "$(app_pid_file "$1")" "$(app_comm "$1")"; }

# Start app $1 from binary $2 in the background, with "${@:3}" (NAME=value) added to its
# environment; its output goes to .allot/logs/$1.log. A running instance is stopped first.
start_app() {
  local name=$1 binary=$2
  shift 2
  [[ -x $binary ]] || die "$binary is missing (did the build fail?)"
  stop_app "$name"
  printf -- '----- %s: starting %s\n' "$(date -Is)" "$binary" >>"$(app_log "$name")"
  nohup env "$@" "$binary" >>"$(app_log "$name")" 2>&1 </dev/null &
  echo "$!" >"$(app_pid_file "$name")"
  log "started $name (pid $!), log $(app_log "$name")"
}

stop_app() {
  local pid
  if pid=$(app_pid "$1"); then
    log "stopping $1 (pid $pid)"
    stop_pid "$pid" "$(app_comm "$1")" 10
  fi
  rm -f "$(app_pid_file "$1")"
}

stop_apps() {
  local app
  for app in "${APPS[@]}"; do stop_app "$app"; done
}

# True when every app named in "$@" is still alive; says which one died otherwise.
apps_alive() {
  local app
  for app in "$@"; do
    app_pid "$app" >/dev/null || {
      warn "$app exited; see $(app_log "$app")"
      return 1
    }
  done
}

http_ok() { curl -fsS --noproxy '*' -o /dev/null --max-time 2 "$1" 2>/dev/null; }

# Wait up to 60 s for URL $1 to answer 2xx while the apps "${@:2}" run. On failure (timeout,
# or an app exited) print their logs, stop them and fail.
wait_apps_ready() {
  local url=$1 deadline=$((SECONDS + 60)) app
  shift
  log "waiting for $url"
  until http_ok "$url"; do
    if ! apps_alive "$@" || ((SECONDS >= deadline)); then
      for app in "$@"; do show_logs "$(app_log "$app")"; done
      for app in "$@"; do stop_app "$app"; done
      die "$url did not answer 200 (an app exited, or 60 s passed)"
    fi
    sleep 0.5
  done
}

# ALLOT_ADMIN_TOKEN from the environment, else the one kept in .allot/admin-token.
admin_token() {
  if [[ -n ${ALLOT_ADMIN_TOKEN:-} ]]; then
    printf '%s\n' "$ALLOT_ADMIN_TOKEN"
    return 0
  fi
  if [[ ! -s $ADMIN_TOKEN_FILE ]]; then
    (umask 077 && random_token >"$ADMIN_TOKEN_FILE")
  fi
  chmod 600 "$ADMIN_TOKEN_FILE"
  cat "$ADMIN_TOKEN_FILE"
}

# ---------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------

cmd_services() {
  require_root
  fd_limit_note
  ensure_packages
  make_state_dirs
  start_postgres
  start_redis
  start_rabbitmq
  log "services ready: PostgreSQL 127.0.0.1:$PG_PORT, Redis 127.0.0.1:$REDIS_PORT, RabbitMQ 127.0.0.1:$RMQ_PORT"
}

cmd_down() {
  require_root
  stop_apps
  stop_rabbitmq
  stop_redis
  stop_postgres
  log "everything this script started is stopped"
}

print_up_summary() {
  local token_source=$ADMIN_TOKEN_FILE
  [[ -n ${ALLOT_ADMIN_TOKEN:-} ]] && token_source='ALLOT_ADMIN_TOKEN (from your environment)'
  cat <<EOF

allot is running at http://$API_ADDR
  web page:     http://$API_ADDR/
  API docs:     http://$API_ADDR/docs/  (OpenAPI: http://$API_ADDR/api-docs/openapi.json)
  metrics:      http://$API_ADDR/metrics  and the worker's http://$WORKER_ADDR/metrics
  admin token:  $token_source
  logs:         $(app_log api)
                $(app_log worker)
  try:          curl -fsS http://$API_ADDR/readyz
  stop:         deploy/local.sh down
EOF
}

cmd_up() {
  cmd_services
  ensure_cargo
  log "building release binaries"
  (cd "$ROOT" && cargo build --release --bins -p allot-api -p allot-worker)
  ensure_database allot
  local bin env
  bin=$(target_dir)/release
  env=(
    "ALLOT_HTTP_ADDR=$API_ADDR"
    "ALLOT_DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/allot"
    "ALLOT_AMQP_URL=amqp://guest:guest@127.0.0.1:$RMQ_PORT/%2f"
    "ALLOT_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0"
    "ALLOT_ADMIN_TOKEN=$(admin_token)"
  )
  stop_app api
  stop_app worker
  require_free_port "${API_ADDR##*:}" allot-api
  require_free_port "${WORKER_ADDR##*:}" allot-worker
  # The API first (see start_functional_allot).
  start_app api "$bin/allot-api" "${env[@]}"
  wait_apps_ready "http://$API_ADDR/readyz" api
  start_app worker "$bin/allot-worker" "${env[@]}" "ALLOT_WORKER_HTTP_ADDR=$WORKER_ADDR"
  wait_apps_ready "http://$WORKER_ADDR/readyz" api worker
  print_up_summary
}

# Run one numbered test step. No `||` here: that would switch off `set -e` inside the step.
# A failing step ends the run through `set -e`; the EXIT trap names the step.
CURRENT_STEP=""
run_step() {
  CURRENT_STEP=$1
  shift
  log "$CURRENT_STEP"
  "$@"
  CURRENT_STEP=""
}

# Cargo's tests: nextest when installed, else cargo test. Environment for the integration tests:
# #[sqlx::test] creates a fresh database per test through DATABASE_URL.
run_cargo_tests() {
  local env=(
    "DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres"
    "ALLOT_TEST_AMQP_URL=amqp://guest:guest@127.0.0.1:$RMQ_PORT/allot-test"
    "ALLOT_TEST_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/2"
  )
  if cargo nextest --version >/dev/null 2>&1; then
    env "${env[@]}" cargo nextest run --workspace --no-fail-fast
  else
    warn "cargo-nextest is not installed; using cargo test"
    env "${env[@]}" cargo test --workspace --no-fail-fast
  fi
}

# A fresh allot (debug build, its own database, vhost, Redis db 3 and port 18080), with "$@"
# (NAME=value) added to its environment. Its admin token is left in FUNCTIONAL_TOKEN. The EXIT
# trap of cmd_test stops it on any path.
start_functional_allot() {
  local bin env
  bin=$(target_dir)/release
  stop_functional_allot
  recreate_database allot_functional
  recreate_vhost allot-functional
  redis_cli -n 3 flushdb >/dev/null
  FUNCTIONAL_TOKEN=$(random_token)
  env=(
    "ALLOT_DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/allot_functional"
    "ALLOT_AMQP_URL=amqp://guest:guest@127.0.0.1:$RMQ_PORT/allot-functional"
    "ALLOT_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/3"
    "ALLOT_ADMIN_TOKEN=$FUNCTIONAL_TOKEN"
    "$@"
  )
  require_free_port "${FUNCTIONAL_ADDR##*:}" "the functional allot-api"
  require_free_port "${FUNCTIONAL_WORKER_ADDR##*:}" "the functional allot-worker"
  rm -f "$(app_log functional-api)" "$(app_log functional-worker)"
  start_api_then_worker functional "$FUNCTIONAL_ADDR" "$FUNCTIONAL_WORKER_ADDR" "$bin" "${env[@]}"
}

stop_functional_allot() {
  stop_app functional-api
  stop_app functional-worker
}

# Run "$@" against the functional allot; on failure show its logs. Fails as "$@" failed.
against_functional_allot() {
  local status=0
  "$@" || status=$?
  ((status == 0)) || show_logs "$(app_log functional-api)" "$(app_log functional-worker)"
  return "$status"
}

# The chaos test, short form: it starts its own services (deploy/local.sh with CHAOS_STATE and
# CHAOS_OFFSET) and its own allot processes, injects every fault under load, checks the
# promises in PostgreSQL, and stops everything it started. It bounds its own run time.
run_chaos_test() {
  local bin
  bin=$(target_dir)/release
  "$bin/chaos-test" --port-offset "$CHAOS_OFFSET" --state "$CHAOS_STATE" --bin-dir "$bin"
}

# Stops the chaos copy (its apps and services), should the chaos test have died without doing so.
stop_chaos_copy() {
  [[ -d $CHAOS_STATE ]] || return 0
  ALLOT_LOCAL_STATE=$CHAOS_STATE ALLOT_LOCAL_PORT_OFFSET=$CHAOS_OFFSET "$ROOT/deploy/local.sh" down >/dev/null 2>&1 ||
    warn "could not stop the chaos test's services (state $CHAOS_STATE)"
}

# Start $1-api listening on $2 and wait until it is ready, then $1-worker with its HTTP server
# on $3 and wait until it is ready too; binaries from $4, environment "${@:5}" (NAME=value).
# The API first: it declares every partition queue before it is ready. Two processes declaring
# the same fresh quorum queues at once on a new vhost made RabbitMQ close the worker's
# connection (INTERNAL_ERROR, or noproc on 3.10) and the worker exit; one after the other, that
# race cannot happen.
start_api_then_worker() {
  local name=$1 api_addr=$2 worker_addr=$3 bin=$4
  shift 4
  start_app "$name-api" "$bin/allot-api" "$@" "ALLOT_HTTP_ADDR=$api_addr"
  wait_apps_ready "http://$api_addr/readyz" "$name-api"
  start_app "$name-worker" "$bin/allot-worker" "$@" "ALLOT_WORKER_HTTP_ADDR=$worker_addr"
  wait_apps_ready "http://$worker_addr/readyz" "$name-api" "$name-worker"
}

# The benchmark (tests/src/bin/bench) against a fresh allot on its own database, vhost, Redis db
# 4 and port, with binaries from $1 (release or debug); "${@:2}" go to the bench (--smoke).
# The reference servers it spawns listen on $BENCH_REFERENCE_ADDR; the naive design gets a
# database of its own. Everything is stopped when the bench ends.
run_bench() {
  local bin=$1 token env status=0
  shift
  recreate_database allot_bench
  recreate_database allot_bench_naive
  recreate_vhost allot-bench
  redis_cli -n 4 flushdb >/dev/null
  token=$(random_token)
  env=(
    "ALLOT_DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/allot_bench"
    "ALLOT_AMQP_URL=amqp://guest:guest@127.0.0.1:$RMQ_PORT/allot-bench"
    "ALLOT_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/4"
    "ALLOT_ADMIN_TOKEN=$token"
  )
  require_free_port "${BENCH_ADDR##*:}" "the benchmark's allot-api"
  require_free_port "${BENCH_WORKER_ADDR##*:}" "the benchmark's allot-worker"
  rm -f "$(app_log bench-api)" "$(app_log bench-worker)"
  start_api_then_worker bench "$BENCH_ADDR" "$BENCH_WORKER_ADDR" "$bin" "${env[@]}"
  timeout 1200 "$bin/bench" --base-url "http://$BENCH_ADDR" --admin-token "$token" \
    --database-url "postgres://postgres@127.0.0.1:$PG_PORT/allot_bench" \
    --amqp-url "amqp://guest:guest@127.0.0.1:$RMQ_PORT/allot-bench" \
    --naive-database-url "postgres://postgres@127.0.0.1:$PG_PORT/allot_bench_naive" \
    --reference-addr "$BENCH_REFERENCE_ADDR" \
    --api-pid "$(app_pid bench-api)" --worker-pid "$(app_pid bench-worker)" \
    --worker-url "http://$BENCH_WORKER_ADDR" "$@" || status=$?
  if ((status != 0)); then
    show_logs "$(app_log bench-api)" "$(app_log bench-worker)"
  fi
  stop_app bench-api
  stop_app bench-worker
  return "$status"
}

# `deploy/local.sh bench [--smoke] [bench flags]`: the benchmark, self-contained: services,
# release build, a fresh allot, every scenario and reference, then allot is stopped again.
# The latency chart goes to docs/bench-latency.svg, beside docs/benchmarks.md; a smoke run's
# (meaningless figures) to $ARTIFACTS instead; unless the flags name a --chart of their own.
cmd_bench() {
  trap 'stop_app bench-api; stop_app bench-worker' EXIT
  local chart=$ROOT/docs/bench-latency.svg own_chart=false arg
  for arg in "$@"; do
    case $arg in
      --smoke) chart=$ARTIFACTS/bench-latency-smoke.svg ;;
      --chart | --chart=*) own_chart=true ;;
    esac
  done
  if $own_chart; then chart=; fi
  cmd_services
  ensure_cargo
  cd "$ROOT"
  build_release
  run_bench "$(target_dir)/release" "$@" ${chart:+--chart "$chart"}
}

# Release binaries of allot and of its test tools (functional test, bench, chaos test). The
# system-level steps of `test` run these, as production would: a debug allot on 2 cores is
# several times slower, and a burst of 5,000 requests then overran the 1 s Redis timeout and
# was refused with 503s that say more about the build than about allot.
build_release() {
  log "building release binaries"
  cargo build --release --bins -p allot-api -p allot-worker -p allot-tests
}

run_functional_test() {
  local bin
  bin=$(target_dir)/release
  start_functional_allot
  against_functional_allot "$bin/functional-test" --base-url "http://$FUNCTIONAL_ADDR" \
    --admin-token "$FUNCTIONAL_TOKEN"
}

# The tools a team uses against allot: Node packages (newman, playwright-core) from the committed
# lock file, schemathesis and PyYAML in a venv under .allot/, Debian's chromium.
install_test_tools() {
  command -v npm >/dev/null || apt_install nodejs npm
  (cd "$BROWSER_TESTS" && npm ci --no-audit --no-fund --loglevel=error)
  if [[ ! -x $VENV/bin/python ]]; then
    python3 -m venv "$VENV" 2>/dev/null || {
      apt_install python3-venv
      rm -rf "$VENV"
      python3 -m venv "$VENV"
    }
  fi
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/tests/tools/requirements.txt"
  have_package chromium /usr/bin/chromium || apt_install chromium
}

# The Postman collection, run by newman against a fresh functional allot.
run_newman() {
  (cd "$BROWSER_TESTS" && npx --no-install newman run "$ROOT/deploy/postman/allot.postman_collection.json" \
    --environment "$ROOT/deploy/postman/allot.postman_environment.json" \
    --env-var "baseUrl=http://$FUNCTIONAL_ADDR" --env-var "adminToken=$FUNCTIONAL_TOKEN" \
    --reporters cli --color off --timeout 120000)
}

# schemathesis against the served OpenAPI document: generated requests to every operation
# (the staff ones with the token), bounded in examples and time; any 5xx fails.
run_schemathesis() {
  # From .allot/, where schemathesis keeps its cache (.schemathesis/, .hypothesis/).
  (cd "$STATE" && timeout 300 "$VENV/bin/schemathesis" run \
    "http://$FUNCTIONAL_ADDR/api-docs/openapi.json" \
    --checks not_a_server_error --max-examples 25 --max-time 90 --request-timeout 20 \
    --header "Authorization: Bearer $FUNCTIONAL_TOKEN" --no-color)
}

# The web page in headless Chromium: load, buy, see the order number; keeps a screenshot.
run_browser_test() {
  mkdir -p "$ARTIFACTS"
  (cd "$BROWSER_TESTS" && env ALLOT_BASE_URL="http://$FUNCTIONAL_ADDR" \
    ALLOT_ADMIN_TOKEN="$FUNCTIONAL_TOKEN" ALLOT_ARTIFACTS="$ARTIFACTS" CHROMIUM=/usr/bin/chromium \
    node --test --test-reporter=spec page.test.mjs)
}

# The functional API logged JSON (ALLOT_LOG_FORMAT=json): every line is a JSON object, and the
# lines logged inside a request carry its request id (newman sends a known one).
check_json_logs() {
  "$VENV/bin/python" "$ROOT/tests/tools/check_json_logs.py" "$(app_log functional-api)" newman-create-product
}

# deploy/docker-compose.yml must at least be valid YAML of the expected shape: no Docker engine
# here to run it (`docker compose config` is used as well when the compose plugin is present).
check_compose_file() {
  "$VENV/bin/python" "$ROOT/tests/tools/check_compose.py" "$ROOT/deploy/docker-compose.yml"
  if docker compose version >/dev/null 2>&1; then
    docker compose -f "$ROOT/deploy/docker-compose.yml" config --quiet
  fi
}

# EXIT trap of `test`: the functional, benchmark and chaos systems never outlive the run; with
# CI=true nothing does.
on_test_exit() {
  local status=$?
  set +e
  [[ $status -ne 0 && -n $CURRENT_STEP ]] && printf '\nerror: step failed: %s\n' "$CURRENT_STEP" >&2
  stop_functional_allot
  stop_app bench-api
  stop_app bench-worker
  stop_chaos_copy
  if [[ ${CI:-} == true ]]; then
    log "CI=true: stopping the services"
    cmd_down
  fi
  exit "$status"
}

cmd_test() {
  trap on_test_exit EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  cmd_services
  ensure_cargo
  cd "$ROOT"
  run_step "[1/15] cargo fmt --all --check" cargo fmt --all --check
  run_step "[2/15] cargo clippy --workspace --all-targets -- -D warnings" \
    cargo clippy --workspace --all-targets -- -D warnings
  run_step "[3/15] preparing test resources" recreate_vhost allot-test
  run_step "[4/15] cargo tests" run_cargo_tests
  run_step "[5/15] release build for the system-level steps" build_release
  run_step "[6/15] functional test against a fresh allot on $FUNCTIONAL_ADDR" run_functional_test
  run_step "[7/15] installing the test tools (npm ci, pip, chromium)" install_test_tools
  run_step "[8/15] a fresh allot on $FUNCTIONAL_ADDR for the tools, logging JSON" \
    start_functional_allot ALLOT_LOG_FORMAT=json
  run_step "[9/15] Postman collection (newman)" against_functional_allot run_newman
  run_step "[10/15] web page in headless Chromium" against_functional_allot run_browser_test
  run_step "[11/15] schemathesis against /api-docs/openapi.json" against_functional_allot run_schemathesis
  run_step "[12/15] JSON logs carry request ids" check_json_logs
  run_step "[13/15] deploy/docker-compose.yml is valid" check_compose_file
  stop_functional_allot
  run_step "[14/15] benchmark smoke run (no timing assertions) on $BENCH_ADDR" \
    run_bench "$(target_dir)/release" --smoke --chart "$ARTIFACTS/bench-latency-smoke.svg"
  run_step "[15/15] chaos test (short form) on its own services, ports +$CHAOS_OFFSET" run_chaos_test
  log "all test steps passed; screenshot of the web page: $ARTIFACTS/web-page.png"
  [[ ${CI:-} == true ]] || log "the services stay up for the next run; deploy/local.sh down stops them"
}

# One status line: name, pid (or "stopped"), address.
status_line() {
  local name=$1 pid=$2 where=$3
  if [[ -n $pid ]]; then
    printf '  %-18s running  pid %-8s %s\n' "$name" "$pid" "$where"
  else
    printf '  %-18s stopped\n' "$name"
  fi
}

cmd_status() {
  echo "allot in $ROOT (state in $STATE)"
  status_line PostgreSQL "$(pg_pid || true)" "127.0.0.1:$PG_PORT  log $PG_LOG"
  status_line Redis "$(redis_pid || true)" "127.0.0.1:$REDIS_PORT  log $REDIS_DIR/redis.log"
  status_line RabbitMQ "$(rmq_pid || true)" "127.0.0.1:$RMQ_PORT  node $RMQ_NODE  log $RMQ_DIR/log/"
  local epmd_state=""
  if epmd_answers; then epmd_state="-"; fi
  status_line epmd "$epmd_state" "127.0.0.1:$RMQ_EPMD_PORT"
  status_line allot-api "$(app_pid api || true)" "http://$API_ADDR  log $(app_log api)"
  status_line allot-worker "$(app_pid worker || true)" "http://$WORKER_ADDR  log $(app_log worker)"
  status_line functional-api "$(app_pid functional-api || true)" "http://$FUNCTIONAL_ADDR"
  status_line functional-worker "$(app_pid functional-worker || true)" ""
}

# `deploy/local.sh env`: the variables that point allot and its tests at this copy's services,
# as shell assignments (`eval "$(deploy/local.sh env)"`).
cmd_env() {
  cat <<EOF
export ALLOT_DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/allot
export ALLOT_AMQP_URL=amqp://guest:guest@127.0.0.1:$RMQ_PORT/%2f
export ALLOT_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0
export ALLOT_HTTP_ADDR=$API_ADDR
export ALLOT_WORKER_HTTP_ADDR=$WORKER_ADDR
export DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres
export ALLOT_TEST_AMQP_URL=amqp://guest:guest@127.0.0.1:$RMQ_PORT/allot-test
export ALLOT_TEST_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/2
EOF
}

# `deploy/local.sh rabbitmqctl ARGS...`: rabbitmqctl against the private node.
cmd_rabbitmqctl() {
  require_root
  rmq_pid >/dev/null || die "RabbitMQ is not running (start it with deploy/local.sh services)"
  rmqctl "$@"
}

# The pid of service $1 (postgres|redis|rabbitmq), if it runs.
service_pid() {
  case $1 in
    postgres) pg_pid ;;
    redis) redis_pid ;;
    rabbitmq) rmq_pid ;;
    *) die "unknown service $1 (postgres, redis or rabbitmq)" ;;
  esac
}

service_comm() {
  case $1 in
    postgres) printf 'postgres\n' ;;
    redis) printf 'redis-server\n' ;;
    rabbitmq) printf 'beam.smp\n' ;;
  esac
}

# `start-service|stop-service|kill-service NAME`: one service of this copy, for fault injection
# (the chaos test). kill-service sends SIGKILL to the server's main process, by its pid file,
# and waits until it is gone; for RabbitMQ the private epmd stays up.
cmd_start_service() {
  require_root
  make_state_dirs
  case ${1:-} in
    postgres) start_postgres ;;
    redis) start_redis ;;
    rabbitmq) start_rabbitmq ;;
    *) die "usage: deploy/local.sh start-service postgres|redis|rabbitmq" ;;
  esac
}

cmd_stop_service() {
  require_root
  case ${1:-} in
    postgres) stop_postgres ;;
    redis) stop_redis ;;
    rabbitmq)
      local pid
      if pid=$(rmq_pid); then
        log "stopping RabbitMQ (pid $pid)"
        rmqctl -q stop "$RMQ_PID_FILE" >/dev/null 2>&1 || true
        stop_pid "$pid" beam.smp 30
      fi
      ;;
    *) die "usage: deploy/local.sh stop-service postgres|redis|rabbitmq" ;;
  esac
}

cmd_kill_service() {
  require_root
  local name=${1:-} pid comm
  [[ -n $name ]] || die "usage: deploy/local.sh kill-service postgres|redis|rabbitmq"
  pid=$(service_pid "$name") || die "$name is not running"
  comm=$(service_comm "$name")
  local victims=("$pid")
  # PostgreSQL: the postmaster and its children (backends, background workers) die together,
  # as in a crash of the machine; a backend left over would keep the shared memory busy and
  # stop the next start.
  [[ $name == postgres ]] && mapfile -t -O 1 victims < <(children_of "$pid")
  log "killing $name (pids ${victims[*]}) with SIGKILL"
  kill -KILL "${victims[@]}" 2>/dev/null || true
  wait_until 30 pid_gone "$pid" "$comm" || die "$name (pid $pid) did not die"
  local victim
  for victim in "${victims[@]}"; do
    wait_until 30 pid_gone "$victim" "$comm" || die "$name (pid $victim) did not die"
  done
  # PostgreSQL refuses to start while the pid in postmaster.pid exists, and a zombie (until
  # its parent reaps it) still does: wait for the reaping; should it never come, the lock file
  # is stale for sure (the process is dead), so remove it.
  if [[ $name == postgres ]] && ! wait_until 10 proc_gone "$pid"; then
    warn "the killed postmaster (pid $pid) is not reaped; removing its stale postmaster.pid"
    rm -f "$PG_DATA/postmaster.pid"
  fi
}

proc_gone() { [[ ! -e /proc/$1 ]]; }

# The pids of the children of process $1 (from /proc, by parent pid; never by name).
children_of() {
  local parent=$1 stat line fields
  for stat in /proc/[0-9]*/stat; do
    read -r line 2>/dev/null <"$stat" || continue
    read -r -a fields <<<"${line##*) }"  # after "pid (comm) ": state, ppid, ...
    [[ ${fields[1]} == "$parent" ]] || continue
    stat=${stat#/proc/}
    printf '%s\n' "${stat%/stat}"
  done
}

usage() {
  cat <<EOF
usage: deploy/local.sh COMMAND

  services  install (when missing) and start private services on loopback:
              PostgreSQL 15  127.0.0.1:$PG_PORT  (user postgres, trust auth)
              Redis          127.0.0.1:$REDIS_PORT
              RabbitMQ       127.0.0.1:$RMQ_PORT  (node $RMQ_NODE, guest/guest)
  up        services, release build, then allot-api on http://$API_ADDR and allot-worker
            (restarted when already running; admin token in .allot/admin-token unless
            ALLOT_ADMIN_TOKEN is set)
  test      services, cargo fmt --check, clippy, cargo tests, the functional test against a
            fresh allot on http://$FUNCTIONAL_ADDR, then against another fresh one: the Postman
            collection (newman), schemathesis, the web page in headless Chromium, and checks of
            the JSON logs and deploy/docker-compose.yml; then the benchmark's smoke form and the
            chaos test (short form) on services of its own (state $CHAOS_STATE, ports
            +$CHAOS_OFFSET); the services stay up afterwards, except with CI=true
  bench [--smoke] [bench flags]
            services, release build, then the benchmark (tests/src/bin/bench) against a fresh
            allot on http://$BENCH_ADDR, reference servers on $BENCH_REFERENCE_ADDR; about 4
            minutes; --smoke is the tiny form \`test\` runs (figures meaningless)
  status    show what runs
  env       print the URLs of these services as shell exports (for cargo test by hand)
  start-service|stop-service|kill-service postgres|redis|rabbitmq
            start, stop (cleanly) or SIGKILL one service of this copy (fault injection)
  rabbitmqctl ARGS...
            rabbitmqctl against the private node (e.g. list_queues -p allot-test name type)
  down      stop everything this script started (apps, then services)

All state (data, logs, pid files) is under $STATE.
EOF
}

main() {
  raise_fd_limit
  local command=${1:-help}
  shift || true
  case $command in
    services) cmd_services ;;
    up) cmd_up ;;
    test) cmd_test ;;
    bench) cmd_bench "$@" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    rabbitmqctl) cmd_rabbitmqctl "$@" ;;
    start-service) cmd_start_service "$@" ;;
    stop-service) cmd_stop_service "$@" ;;
    kill-service) cmd_kill_service "$@" ;;
    help | -h | --help) usage ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
