#!/usr/bin/env bash
# deploy/services.sh: PostgreSQL 15, Redis and RabbitMQ as private instances, started and
# stopped as their own users (postgres, redis, rabbitmq), which is root's work and shell's.
#
#   deploy/services.sh start|stop|kill|pid postgres|redis|rabbitmq
#   deploy/services.sh down                 stop RabbitMQ (and its epmd), Redis, PostgreSQL
#   deploy/services.sh rabbitmqctl ARGS...  rabbitmqctl against the private node
#
# It is a leaf: it calls nothing of allot's. xtask (tests/src/bin/xtask), behind
# deploy/local.sh, and the chaos test call it, with the copy's state folder and every port in
# the environment; the port map itself lives in Rust (tests/src/ports.rs), never here:
#   ALLOT_STATE              the copy's state folder (data, logs, pid files)
#   ALLOT_PG_PORT            PostgreSQL
#   ALLOT_REDIS_PORT         Redis
#   ALLOT_RABBITMQ_PORT      RabbitMQ's AMQP port
#   ALLOT_RABBITMQ_DIST_PORT Erlang distribution
#   ALLOT_EPMD_PORT          the node's own epmd, so that stopping it touches nobody else's
#   ALLOT_RABBITMQ_NODE      the node's name (each copy has its own)
# Processes are found through their own pid files only; nothing is ever killed by name.
# `kill` sends SIGKILL to the server (PostgreSQL: with its children) and waits until it is
# gone; for RabbitMQ the epmd stays up, as `stop` leaves it.
set -euo pipefail

require() {
  [[ -n ${!1:-} ]] || {
    echo "error: deploy/services.sh needs $1 (xtask sets it; see tests/src/ports.rs)" >&2
    exit 2
  }
}
for variable in ALLOT_STATE ALLOT_PG_PORT ALLOT_REDIS_PORT ALLOT_RABBITMQ_PORT \
  ALLOT_RABBITMQ_DIST_PORT ALLOT_EPMD_PORT ALLOT_RABBITMQ_NODE; do
  require "$variable"
done
[[ $EUID -eq 0 ]] || {
  echo "error: run me as root (I start the servers as the postgres, redis and rabbitmq users)" >&2
  exit 1
}

STATE=$ALLOT_STATE
mkdir -p "$STATE" && STATE=$(cd "$STATE" && pwd)  # absolute: the services run from elsewhere
LOG_DIR=$STATE/logs

PG_BIN=/usr/lib/postgresql/15/bin
PG_PORT=$ALLOT_PG_PORT
PG_DIR=$STATE/pg     # owned by postgres: data/, postgres.log and the unix socket
PG_DATA=$PG_DIR/data
PG_LOG=$PG_DIR/postgres.log

REDIS_PORT=$ALLOT_REDIS_PORT
REDIS_DIR=$STATE/redis  # owned by redis: append-only files, redis.pid, redis.log
REDIS_PID_FILE=$REDIS_DIR/redis.pid

RMQ_NODE=$ALLOT_RABBITMQ_NODE
RMQ_PORT=$ALLOT_RABBITMQ_PORT
RMQ_DIST_PORT=$ALLOT_RABBITMQ_DIST_PORT
RMQ_EPMD_PORT=$ALLOT_EPMD_PORT
RMQ_DIR=$STATE/rabbitmq  # owned by rabbitmq: mnesia/, log/, config files, rabbitmq.pid
RMQ_PID_FILE=$RMQ_DIR/rabbitmq.pid
EPMD_PID_FILE=$STATE/epmd.pid

# The environment every RabbitMQ command (server and CLI) gets, so that they all talk to the
# private node. rabbitmqctl switches to the rabbitmq user through `su`, which keeps them.
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

log() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
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

proc_gone() { [[ ! -e /proc/$1 ]]; }

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

# Print the last lines of each log file given, for a failure report.
show_logs() {
  local file
  for file in "$@"; do
    [[ -f $file ]] || continue
    printf '\n----- last lines of %s -----\n' "$file" >&2
    tail -n 40 "$file" >&2
  done
}

# ---------------------------------------------------------------------------------------------
# PostgreSQL 15, data in $STATE/pg/data, trust authentication
# ---------------------------------------------------------------------------------------------

as_postgres() { runuser -u postgres -- "$@"; }

pg_pid() { live_pid "$PG_DATA/postmaster.pid" postgres; }

pg_answers() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; }

# The unix socket goes into $PG_DIR unless that path is too long for a socket (107 bytes);
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

start_postgres() {
  local pid options
  if pid=$(pg_pid); then
    log "PostgreSQL already running (pid $pid) on 127.0.0.1:$PG_PORT"
  else
    [[ -x $PG_BIN/postgres ]] || die "PostgreSQL 15 is not installed (deploy/local.sh installs it)"
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
    require_free_port "$PG_PORT" PostgreSQL
    ensure_traversable postgres "$STATE"
    make_owned_dirs postgres "$PG_DIR"
    pg_init
    options="-p $PG_PORT -c listen_addresses=127.0.0.1 -c max_connections=400"
    options+=" -c unix_socket_directories='$(pg_socket_dir)'"
    as_postgres "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -o "$options" -w -t 60 start >/dev/null || {
      show_logs "$PG_LOG"
      die "PostgreSQL did not start"
    }
  fi
  wait_until 60 pg_answers || die "PostgreSQL does not answer on 127.0.0.1:$PG_PORT (see $PG_LOG)"
}

stop_postgres() {
  pg_pid >/dev/null || return 0
  log "stopping PostgreSQL"
  as_postgres "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null
}

# ---------------------------------------------------------------------------------------------
# Redis, append-only file in $STATE/redis
# ---------------------------------------------------------------------------------------------

redis_pid() { live_pid "$REDIS_PID_FILE" redis-server; }

redis_answers() { [[ $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null </dev/null) == PONG ]]; }

start_redis() {
  local pid
  if pid=$(redis_pid); then
    log "Redis already running (pid $pid) on 127.0.0.1:$REDIS_PORT"
  else
    command -v redis-server >/dev/null || die "Redis is not installed (deploy/local.sh installs it)"
    log "starting Redis on 127.0.0.1:$REDIS_PORT"
    require_free_port "$REDIS_PORT" Redis
    ensure_traversable redis "$STATE"
    make_owned_dirs redis "$REDIS_DIR"
    # --save '': no RDB snapshots on top of the append-only file (they would only add forks).
    runuser -u redis -- redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" \
      --dir "$REDIS_DIR" --pidfile "$REDIS_PID_FILE" --logfile "$REDIS_DIR/redis.log" \
      --appendonly yes --appendfsync everysec --save '' </dev/null
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
# RabbitMQ: a private node, its own epmd
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
    "# generated by deploy/services.sh" \
    "listeners.tcp.local = 127.0.0.1:$RMQ_PORT" >"$RMQ_DIR/rabbitmq.conf"
  printf '[].\n' >"$RMQ_DIR/enabled_plugins"
  : >"$RMQ_DIR/rabbitmq-env.conf"  # keeps /etc/rabbitmq/rabbitmq-env.conf out
}

# epmd, the Erlang name server, on a port of its own. If none answers there, the node (or
# rabbitmqctl) starts one by itself, daemonised, without a pid file. So whatever epmd answers on
# our private port is the one our node uses: reuse it, and stop it through epmd's own -kill.
epmd_answers() { epmd -port "$RMQ_EPMD_PORT" -names >/dev/null 2>&1; }

epmd_gone() { ! epmd_answers; }

start_epmd() {
  epmd_answers && return 0
  require_free_port "$RMQ_EPMD_PORT" epmd
  nohup setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
    epmd -address 127.0.0.1 -port "$RMQ_EPMD_PORT" >>"$LOG_DIR/epmd.log" 2>&1 </dev/null &
  echo "$!" >"$EPMD_PID_FILE"
  # 30 s: on a loaded machine (other builds running) epmd can take a while to answer.
  wait_until 30 epmd_answers || die "epmd did not start on 127.0.0.1:$RMQ_EPMD_PORT"
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

start_rabbitmq() {
  local pid
  if pid=$(rmq_pid); then
    log "RabbitMQ already running (pid $pid) on 127.0.0.1:$RMQ_PORT"
  else
    [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] ||
      die "RabbitMQ is not installed (deploy/local.sh installs it)"
    log "starting RabbitMQ node $RMQ_NODE on 127.0.0.1:$RMQ_PORT"
    require_free_port "$RMQ_PORT" RabbitMQ
    ensure_traversable rabbitmq "$STATE"
    make_owned_dirs rabbitmq "$RMQ_DIR" "$RMQ_DIR/mnesia" "$RMQ_DIR/log"
    rmq_write_config
    start_epmd
    # Not through /usr/sbin/rabbitmq-server: that wrapper switches user with `su`, which resets
    # the open-files limit to 1024. RabbitMQ sizes its file-handle budget from that limit, and
    # with a few hundred quorum queues it then stops serving new connections. setpriv keeps ours.
    env "${RMQ_ENV[@]}" HOME=/var/lib/rabbitmq \
      setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
      /usr/lib/rabbitmq/bin/rabbitmq-server -detached >>"$LOG_DIR/rabbitmq-start.log" 2>&1 </dev/null
  fi
  wait_until 90 rmq_answers || {
    show_logs "$LOG_DIR/rabbitmq-start.log" "$RMQ_DIR/log/$RMQ_NODE.log"
    die "RabbitMQ did not come up on 127.0.0.1:$RMQ_PORT within 90 s"
  }
}

# Stops the node; its epmd stays (a restart uses it again).
stop_rabbitmq() {
  local pid
  pid=$(rmq_pid) || return 0
  log "stopping RabbitMQ (pid $pid)"
  # `stop <pid file>` returns once the node's process has exited.
  rmqctl -q stop "$RMQ_PID_FILE" >/dev/null 2>&1 || true
  stop_pid "$pid" beam.smp 30
}

# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

service_pid() {
  case $1 in
    postgres) pg_pid ;;
    redis) redis_pid ;;
    rabbitmq) rmq_pid ;;
    *) die "unknown service ${1:-} (postgres, redis or rabbitmq)" ;;
  esac
}

service_comm() {
  case $1 in
    postgres) printf 'postgres\n' ;;
    redis) printf 'redis-server\n' ;;
    rabbitmq) printf 'beam.smp\n' ;;
  esac
}

cmd_start() {
  case ${1:-} in
    postgres) start_postgres ;;
    redis) start_redis ;;
    rabbitmq) start_rabbitmq ;;
    *) die "usage: deploy/services.sh start postgres|redis|rabbitmq" ;;
  esac
}

cmd_stop() {
  case ${1:-} in
    postgres) stop_postgres ;;
    redis) stop_redis ;;
    rabbitmq) stop_rabbitmq ;;
    *) die "usage: deploy/services.sh stop postgres|redis|rabbitmq" ;;
  esac
}

# SIGKILL to the server's main process, by its pid file, and wait until it is gone.
cmd_kill() {
  local name=${1:-} pid comm victim
  [[ -n $name ]] || die "usage: deploy/services.sh kill postgres|redis|rabbitmq"
  pid=$(service_pid "$name") || die "$name is not running"
  comm=$(service_comm "$name")
  local victims=("$pid")
  # PostgreSQL: the postmaster and its children (backends, background workers) die together,
  # as in a crash of the machine; a backend left over would keep the shared memory busy and
  # stop the next start.
  [[ $name == postgres ]] && mapfile -t -O 1 victims < <(children_of "$pid")
  log "killing $name (pids ${victims[*]}) with SIGKILL"
  kill -KILL "${victims[@]}" 2>/dev/null || true
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

cmd_down() {
  stop_rabbitmq
  stop_epmd
  stop_redis
  stop_postgres
}

cmd_rabbitmqctl() {
  rmq_pid >/dev/null || die "RabbitMQ is not running"
  rmqctl "$@"
}

mkdir -p "$LOG_DIR"
command=${1:-}
shift || true
case $command in
  start) cmd_start "$@" ;;
  stop) cmd_stop "$@" ;;
  kill) cmd_kill "$@" ;;
  pid) service_pid "${1:-}" ;;
  down) cmd_down ;;
  rabbitmqctl) cmd_rabbitmqctl "$@" ;;
  *)
    sed -n '2,8p' "$0" >&2
    exit 2
    ;;
esac
