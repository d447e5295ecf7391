# Sourced by scripts that run the system on the side: fresh databases and a fresh
# RabbitMQ virtual host for one run, removed on exit with whatever was served.
#   sandbox_start NAME              exports ORDERFLOW_AMQP_URL, every service's
#                                   database URL and a data folder of its own
#   sandbox_serve BINARY SERVICES PORT...
#                                   migrates, serves, waits for every port to be ready
# rabbitmqctl lives in /usr/sbin on Debian.
export PATH="$PATH:/usr/sbin:/sbin"

sandbox_server=""
# Every service's database, not only the served ones': `orderflow migrate` migrates
# them all, and must not touch the machine's own.
sandbox_services=(order inventory payment user notification)
sandbox_start() {
  sandbox_run="$1"
  sandbox_vhost="orderflow-$sandbox_run"
  export ORDERFLOW_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/$sandbox_vhost"
  for service in "${sandbox_services[@]}"; do
    export "ORDERFLOW_${service^^}_DATABASE_URL=postgres://postgres@127.0.0.1:5432/orderflow_${sandbox_run}_$service"
  done
  # The generated token and digest secrets live (and die) with the run.
  ORDERFLOW_DATA_DIR=$(mktemp -d)
  export ORDERFLOW_DATA_DIR
  trap sandbox_cleanup EXIT
  rabbitmqctl -q add_vhost "$sandbox_vhost"
  rabbitmqctl -q set_permissions -p "$sandbox_vhost" guest '.*' '.*' '.*'
}

sandbox_cleanup() {
  [ -n "$sandbox_server" ] && kill "$sandbox_server" 2>/dev/null && wait "$sandbox_server" 2>/dev/null
  rabbitmqctl -q delete_vhost "$sandbox_vhost" >/dev/null 2>&1 || true
  rm -rf "$ORDERFLOW_DATA_DIR"
  for service in "${sandbox_services[@]}"; do
    psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS orderflow_${sandbox_run}_$service WITH (FORCE)" postgres || true
  done
}

sandbox_serve() {
  local binary="$1" services="$2"
  shift 2
  # Another system answering on these ports would pass for this one.
  for port in "$@"; do
    if curl -s -o /dev/null "http://127.0.0.1:$port/health/live"; then
      echo "sandbox: something already answers on port $port" >&2
      exit 1
    fi
  done
  "$binary" migrate >/dev/null
  "$binary" serve --services "$services" &
  sandbox_server=$!
  local ready=0
  for _ in $(seq 1 300); do
    ready=1
    for port in "$@"; do
      curl -sf "http://127.0.0.1:$port/health/ready" >/dev/null || ready=0
    done
    [ "$ready" = 1 ] && return 0
    kill -0 "$sandbox_server" 2>/dev/null || { echo "sandbox: the services stopped" >&2; exit 1; }
    sleep 0.1
  done
  echo "sandbox: the services did not become ready" >&2
  exit 1
}
