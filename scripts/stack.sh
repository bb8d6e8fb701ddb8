#!/usr/bin/env bash
# The local stack without Docker: Apache Kafka 4 (KRaft, jars from Maven Central), PostgreSQL 15 and
# Redis 7 (Debian packages), and the ClickHouse engine through chDB (a folder, used in-process).
#
#   scripts/stack.sh up      install what is missing, start everything, wait until each part answers
#   scripts/stack.sh down    stop everything the stack started (services, Kafka, Redis, PostgreSQL)
#   scripts/stack.sh status  say what is up and where it listens
#   scripts/stack.sh leftovers  list processes of this stack still running (exit 1 if any)
#
# Everything lives under .stack/ (ignored by git). `.stack/env` holds the connection settings as
# `export DATA_PROC_...=...` lines; the generated passwords are created once and kept across runs.
# Every command is idempotent. Settings: KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (9093),
# POSTGRES_PORT (5432), PG_CLUSTER (main), REDIS_PORT (6379), KAFKA_LIBS (jar folder),
# KAFKA_HEAP_MIN/KAFKA_HEAP_MAX (512m/1g). Other ports and a second PostgreSQL cluster let a second
# stack (e.g. a CI run in another clone) run beside this one.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="${DATA_PROC_STACK_DIR:-$ROOT/.stack}"
RUN="$STACK/run"
KAFKA_VERSION="4.4.0"
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_LIBS="${KAFKA_LIBS:-$HOME/.cache/data-processing/kafka-$KAFKA_VERSION/libs}"
KAFKA_HEAP_MIN="${KAFKA_HEAP_MIN:-512m}"
KAFKA_HEAP_MAX="${KAFKA_HEAP_MAX:-1g}"
KAFKA_DIR="$STACK/kafka"
PG_VERSION="15"
PG_CLUSTER="${PG_CLUSTER:-main}"
POSTGRES_PORT="${POSTGRES_PORT:-5432}"
PG_DB="reference_data"
PG_USER="dataproc"
REDIS_PORT="${REDIS_PORT:-6379}"
REDIS_DIR="$STACK/redis"
CHDB_DIR="$STACK/chdb"
SECRETS="$STACK/secrets"
ENV_FILE="$STACK/env"
READY_TIMEOUT="${READY_TIMEOUT:-90}"

say() { printf '[stack] %s\n' "$*"; }
die() { printf '[stack] ERROR: %s\n' "$*" >&2; exit 1; }

# --- helpers -------------------------------------------------------------------------------------

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Wait until a condition command succeeds, polling, up to a deadline in seconds.
wait_for() {
    local what="$1" timeout="$2"; shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "$what did not become ready within ${timeout}s"
        sleep 0.2
    done
}

# Send TERM to the process of a pid file, wait for it to exit (KILL after a deadline), remove the file.
stop_pid() {
    local name="$1" pidfile="$2" timeout="${3:-30}"
    if ! pid_alive "$pidfile"; then
        rm -f "$pidfile"
        say "$name: not running"
        return 0
    fi
    local pid; pid="$(cat "$pidfile")"
    say "$name: stopping (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + timeout))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            say "$name: did not stop within ${timeout}s, killing"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        sleep 0.2
    done
    rm -f "$pidfile"
    say "$name: stopped"
}

apt_updated=0
apt_install() {
    if ((apt_updated == 0)); then
        say "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

gen_secret() { python3 -c 'import secrets; print(secrets.token_hex(16))'; }

# --- installation --------------------------------------------------------------------------------

ensure_packages() {
    local missing=()
    command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
    [[ -x "/usr/lib/postgresql/$PG_VERSION/bin/postgres" ]] || missing+=("postgresql-$PG_VERSION")
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v pg_isready >/dev/null || missing+=(postgresql-client)
    if ((${#missing[@]})); then
        apt_install "${missing[@]}"
        # Debian's package may have started its own Redis (no password) where this stack's goes.
        if [[ " ${missing[*]} " == *" redis-server "* ]] \
            && redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
            say "redis: stopping the instance the Debian package started"
            redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
        fi
    fi
}

ensure_uv() {
    if ! command -v uv >/dev/null; then
        say "installing uv from PyPI"
        python3 -m pip install --quiet uv 2>/dev/null \
            || python3 -m pip install --quiet --user --break-system-packages uv
        export PATH="$HOME/.local/bin:$PATH"
        command -v uv >/dev/null || die "uv not on PATH after installing it"
    fi
    say "uv sync (workspace environment: $(uv --version))"
    (cd "$ROOT" && uv sync --frozen --all-packages --quiet)
}

ensure_kafka_jars() {
    # The jar folder is rebuilt whenever scripts/kafka/pom.xml changes (its checksum is kept there).
    local pom="$ROOT/scripts/kafka/pom.xml" sum
    sum="$(sha256sum "$pom" | cut -d' ' -f1)"
    if [[ -f "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" && "$(cat "$KAFKA_LIBS/.pom.sha256" 2>/dev/null)" == "$sum" ]]; then
        return 0
    fi
    command -v mvn >/dev/null || apt_install maven
    say "kafka: copying broker jars from Maven Central to $KAFKA_LIBS"
    rm -rf "$KAFKA_LIBS.tmp"
    mkdir -p "$KAFKA_LIBS.tmp"
    mvn -q -B -f "$pom" dependency:copy-dependencies -DoutputDirectory="$KAFKA_LIBS.tmp"
    [[ -f "$KAFKA_LIBS.tmp/kafka_2.13-$KAFKA_VERSION.jar" ]] || die "kafka jars missing after mvn"
    echo "$sum" >"$KAFKA_LIBS.tmp/.pom.sha256"
    rm -rf "$KAFKA_LIBS"
    mv "$KAFKA_LIBS.tmp" "$KAFKA_LIBS"
}

ensure_secrets() {
    mkdir -p "$STACK" "$RUN"
    chmod 700 "$STACK"
    if [[ ! -f "$SECRETS" ]]; then
        say "generating local passwords in $SECRETS"
        umask 077
        printf 'PG_PASSWORD=%s\nREDIS_PASSWORD=%s\n' "$(gen_secret)" "$(gen_secret)" >"$SECRETS"
    fi
    # shellcheck disable=SC1090
    source "$SECRETS"
}

write_env() {
    umask 077
    cat >"$ENV_FILE" <<EOF
# Generated by scripts/stack.sh: connection settings of the local stack. Do not commit.
export DATA_PROC_ENV=local
export DATA_PROC_KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT
export DATA_PROC_POSTGRES_DSN=postgresql://$PG_USER:$PG_PASSWORD@127.0.0.1:$POSTGRES_PORT/$PG_DB
export DATA_PROC_REDIS_URL=redis://:$REDIS_PASSWORD@127.0.0.1:$REDIS_PORT/0
export DATA_PROC_CLICKHOUSE_URL=$CHDB_DIR
export DATA_PROC_STACK_DIR=$STACK
EOF
    say "wrote $ENV_FILE"
}

# --- Kafka ---------------------------------------------------------------------------------------

kafka_config() {
    mkdir -p "$KAFKA_DIR/data" "$KAFKA_DIR/logs"
    cat >"$KAFKA_DIR/server.properties" <<EOF
# Generated by scripts/stack.sh: single-node KRaft broker + controller on loopback.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$KAFKA_DIR/data
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false
delete.topic.enable=true
group.initial.rebalance.delay.ms=0
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=8
transaction.abort.timed.out.transaction.cleanup.interval.ms=5000
transaction.remove.expired.transaction.cleanup.interval.ms=60000
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
log.retention.hours=24
log.segment.bytes=67108864
log.retention.check.interval.ms=60000
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
EOF
}

kafka_up() {
    ensure_kafka_jars
    if pid_alive "$RUN/kafka.pid"; then
        say "kafka: already running (pid $(cat "$RUN/kafka.pid"))"
    else
        local port
        for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
            if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
                die "kafka: 127.0.0.1:$port is taken by a process this stack did not start"
            fi
        done
        kafka_config
        local cp="$KAFKA_LIBS/*"
        if [[ ! -f "$KAFKA_DIR/data/meta.properties" ]]; then
            local cluster_id
            # a random cluster id as Kafka makes them: never starting with "-", which the storage
            # tool's argument parser would take for an option (1 id in 64 otherwise)
            cluster_id="$(python3 -c 'import base64, uuid
while (cid := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")).startswith("-"):
    pass
print(cid)')"
            say "kafka: formatting storage (cluster id $cluster_id)"
            java -Xmx256m -cp "$cp" -Dlog4j2.configurationFile="$ROOT/scripts/kafka/log4j2.yaml" \
                -Dkafka.logs.dir="$KAFKA_DIR/logs" \
                kafka.tools.StorageTool format --standalone -t "$cluster_id" \
                -c "$KAFKA_DIR/server.properties" >"$KAFKA_DIR/logs/format.log" 2>&1 \
                || { cat "$KAFKA_DIR/logs/format.log" >&2; die "kafka: storage format failed"; }
        fi
        say "kafka: starting broker $KAFKA_VERSION on 127.0.0.1:$KAFKA_PORT (controller :$KAFKA_CONTROLLER_PORT)"
        setsid nohup java -Xms"$KAFKA_HEAP_MIN" -Xmx"$KAFKA_HEAP_MAX" -XX:+UseG1GC \
            -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
            -Dlog4j2.configurationFile="$ROOT/scripts/kafka/log4j2.yaml" \
            -Dkafka.logs.dir="$KAFKA_DIR/logs" \
            -cp "$cp" kafka.Kafka "$KAFKA_DIR/server.properties" \
            >"$KAFKA_DIR/logs/stdout.log" 2>&1 </dev/null &
        echo $! >"$RUN/kafka.pid"
    fi
    (cd "$ROOT" && uv run --frozen --quiet python -m dptools.wait kafka \
        --bootstrap "127.0.0.1:$KAFKA_PORT" --timeout "$READY_TIMEOUT") \
        || { tail -n 30 "$KAFKA_DIR/logs/stdout.log" >&2 || true; die "kafka: not ready"; }
}

kafka_status() {
    if pid_alive "$RUN/kafka.pid"; then
        echo "kafka       up    127.0.0.1:$KAFKA_PORT (pid $(cat "$RUN/kafka.pid"), data $KAFKA_DIR)"
    else
        echo "kafka       down"
    fi
}

# --- PostgreSQL ----------------------------------------------------------------------------------

pg_running() { pg_lsclusters -h 2>/dev/null | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1==v && $2==c {print $4}' | grep -q online; }

pg_up() {
    if ! pg_lsclusters -h 2>/dev/null | awk '{print $1" "$2}' | grep -qx "$PG_VERSION $PG_CLUSTER"; then
        say "postgres: creating cluster $PG_VERSION/$PG_CLUSTER"
        pg_createcluster "$PG_VERSION" "$PG_CLUSTER" -p "$POSTGRES_PORT" >/dev/null
    fi
    if pg_running; then
        say "postgres: already running"
    else
        say "postgres: starting cluster $PG_VERSION/$PG_CLUSTER on 127.0.0.1:$POSTGRES_PORT"
        pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start
    fi
    wait_for "postgres" "$READY_TIMEOUT" pg_isready -q -h 127.0.0.1 -p "$POSTGRES_PORT"
    # Role and database, idempotently; the password goes through stdin, never on a command line.
    runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -p "$POSTGRES_PORT" -d postgres >/dev/null <<SQL
SELECT 'CREATE ROLE $PG_USER LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER')\gexec
ALTER ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
SELECT 'CREATE DATABASE $PG_DB OWNER $PG_USER' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DB')\gexec
SQL
    PGPASSWORD="$PG_PASSWORD" psql -q -h 127.0.0.1 -p "$POSTGRES_PORT" -U "$PG_USER" -d "$PG_DB" \
        -c 'SELECT 1' >/dev/null || die "postgres: cannot log in as $PG_USER"
    say "postgres: ready, database $PG_DB owned by $PG_USER"
}

pg_down() {
    if pg_running; then
        say "postgres: stopping cluster $PG_VERSION/$PG_CLUSTER"
        pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" stop -m fast
        say "postgres: stopped"
    else
        say "postgres: not running"
    fi
}

pg_status() {
    if pg_running; then
        echo "postgres    up    127.0.0.1:$POSTGRES_PORT (cluster $PG_VERSION/$PG_CLUSTER, database $PG_DB)"
    else
        echo "postgres    down"
    fi
}

# --- Redis ---------------------------------------------------------------------------------------

redis_ping() { REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping | grep -q PONG; }

redis_up() {
    mkdir -p "$REDIS_DIR"
    if pid_alive "$RUN/redis.pid"; then
        say "redis: already running (pid $(cat "$RUN/redis.pid"))"
    else
        umask 077
        cat >"$REDIS_DIR/redis.conf" <<EOF
# Generated by scripts/stack.sh.
bind 127.0.0.1
port $REDIS_PORT
requirepass $REDIS_PASSWORD
dir $REDIS_DIR
pidfile $RUN/redis.pid
logfile $REDIS_DIR/redis.log
daemonize yes
save 300 100
appendonly no
EOF
        if (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT") 2>/dev/null; then
            die "redis: 127.0.0.1:$REDIS_PORT is taken by a process this stack did not start"
        fi
        say "redis: starting on 127.0.0.1:$REDIS_PORT"
        redis-server "$REDIS_DIR/redis.conf"
    fi
    wait_for "redis" "$READY_TIMEOUT" redis_ping
    say "redis: ready"
}

redis_status() {
    if pid_alive "$RUN/redis.pid"; then
        echo "redis       up    127.0.0.1:$REDIS_PORT (pid $(cat "$RUN/redis.pid"))"
    else
        echo "redis       down"
    fi
}

# --- commands ------------------------------------------------------------------------------------

cmd_up() {
    local start=$SECONDS
    ensure_packages
    ensure_secrets
    ensure_uv
    mkdir -p "$CHDB_DIR"
    write_env
    kafka_up
    pg_up
    redis_up
    say "chdb: data folder $CHDB_DIR"
    say "up in $((SECONDS - start))s; connection settings: source $ENV_FILE"
}

cmd_down() {
    local pidfile
    for pidfile in "$RUN"/*.pid; do
        [[ -e "$pidfile" ]] || continue
        case "$(basename "$pidfile")" in
            kafka.pid | redis.pid) ;;
            *) stop_pid "$(basename "$pidfile" .pid)" "$pidfile" 30 ;;
        esac
    done
    stop_pid kafka "$RUN/kafka.pid" 60
    stop_pid redis "$RUN/redis.pid" 30
    pg_down
}

cmd_status() {
    [[ -f "$SECRETS" ]] && source "$SECRETS"
    kafka_status
    pg_status
    redis_status
    echo "chdb        $( [[ -d "$CHDB_DIR" ]] && echo "folder $CHDB_DIR" || echo "absent")"
    local pidfile
    for pidfile in "$RUN"/*.pid; do
        [[ -e "$pidfile" ]] || continue
        case "$(basename "$pidfile")" in
            kafka.pid | redis.pid) ;;
            *)
                local name; name="$(basename "$pidfile" .pid)"
                if pid_alive "$pidfile"; then printf '%-11s up    pid %s\n' "$name" "$(cat "$pidfile")"
                else printf '%-11s down  (stale pid file)\n' "$name"; fi ;;
        esac
    done
    [[ -f "$ENV_FILE" ]] && echo "env         $ENV_FILE"
    return 0
}

# Processes of this stack still alive after `down` (matched by this stack's own paths); prints them.
cmd_leftovers() {
    local found=0
    if pgrep -af -- "$STACK/" ; then found=1; fi
    if pgrep -af -- "/var/lib/postgresql/$PG_VERSION/$PG_CLUSTER" ; then found=1; fi
    if pg_running; then echo "postgres cluster $PG_VERSION/$PG_CLUSTER is online"; found=1; fi
    local port
    for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$POSTGRES_PORT" "$REDIS_PORT"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "something listens on 127.0.0.1:$port"; found=1; fi
    done
    return $((found))
}

case "${1:-}" in
    up) cmd_up ;;
    leftovers) cmd_leftovers ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status|leftovers" >&2; exit 2 ;;
esac
