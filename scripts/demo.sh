#!/usr/bin/env bash
# Set up, start the gradwatch server on SQLite, and stream a reference GradNorm run into it.
# The server keeps running afterwards so the dashboard stays up; Ctrl-C stops it.
#   PORT=8001 bash scripts/demo.sh        # another port
#   DEMO_ARGS="--method equal" bash ...   # other trainer arguments (default: 150 epochs, ~1 min,
#                                         # long enough to watch the charts grow)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
port=${PORT:-8000}
url="http://127.0.0.1:${port}"
mkdir -p .gradwatch
.venv/bin/gradwatch serve --port "$port" >.gradwatch/server.log 2>&1 &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 60); do
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "gradwatch serve failed:"; cat .gradwatch/server.log; exit 1
    fi
    .venv/bin/python -c "import urllib.request; urllib.request.urlopen('$url/health', timeout=1)" \
        2>/dev/null && break
    sleep 0.5
done
echo "gradwatch dashboard: $url   (server log: .gradwatch/server.log, database: gradwatch.db)"
# shellcheck disable=SC2086
.venv/bin/gradwatch train --dataset cmapss --method gradnorm --server "$url" ${DEMO_ARGS:---epochs 150}
echo
echo "Training done. The dashboard is still at $url - press Ctrl-C to stop the server."
wait "$server_pid"
