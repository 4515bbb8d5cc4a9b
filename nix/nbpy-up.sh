# `nix run`: the whole appliance natively. `nbpy up` starts InfluxDB itself
# (influxd is on PATH) but not Grafana, so this starts a private Grafana
# first, on 127.0.0.1:3000 with its state under $XDG_STATE_HOME/nbpy-grafana,
# and hands it to `nbpy up`, whose phase 4 applies the datasource and
# dashboards through Grafana's API. Grafana stops when `nbpy up` ends.
#
# Set NBPY_GRAFANA__URL to use a Grafana of your own instead (none is
# started then); GRAFANA_PORT picks another port. GRAFANA_HOME (Grafana's
# static files) comes from the Nix wrapper.

if [ -n "${NBPY_GRAFANA__URL:-}" ]; then
  exec nbpy up "$@"
fi

state="${XDG_STATE_HOME:-${HOME:-.}/.local/state}/nbpy-grafana"
port="${GRAFANA_PORT:-3000}"
url="http://127.0.0.1:$port"
mkdir -p "$state"
password="$state/admin-password"
if [ ! -s "$password" ]; then
  (umask 077 && head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$password")
fi

GF_PATHS_DATA="$state/data" \
  GF_PATHS_LOGS="$state/logs" \
  GF_PATHS_PLUGINS="$state/plugins" \
  GF_SERVER_HTTP_ADDR=127.0.0.1 \
  GF_SERVER_HTTP_PORT="$port" \
  GF_SECURITY_ADMIN_USER=admin \
  GF_SECURITY_ADMIN_PASSWORD__FILE="$password" \
  GF_ANALYTICS_REPORTING_ENABLED=false \
  grafana server --homepath "$GRAFANA_HOME" > "$state/grafana.log" 2>&1 &
grafana_pid=$!
stop_grafana() {
  kill "$grafana_pid" 2>/dev/null || true
  wait "$grafana_pid" 2>/dev/null || true
}
trap stop_grafana EXIT

# Until Grafana answers, at most 60 s; without it the appliance still runs
# (phase 4 then reports that Grafana could not be reached).
for _ in $(seq 120); do
  if curl -sf "$url/api/health" > /dev/null; then
    echo "nbpy-up: Grafana at $url (user admin, password in $password)" >&2
    break
  fi
  if ! kill -0 "$grafana_pid" 2>/dev/null; then
    echo "nbpy-up: Grafana exited; see $state/grafana.log" >&2
    break
  fi
  sleep 0.5
done

export NBPY_GRAFANA__URL="$url"
export NBPY_GRAFANA__ADMIN_USER=admin
export NBPY_GRAFANA__ADMIN_PASSWORD_FILE="$password"
nbpy up "$@"
