#!/usr/bin/env bash
# Screenshot the local SwanLab dashboard of a local-mode run, headless, without network.
#
#   scripts/swanlab_screenshot.sh OUTPUT_DIR/swanlog [out.png] [port] [page]
#
# Starts `swanlab watch` on 127.0.0.1, waits until it answers, screenshots PAGE (default: the first experiment's
# charts, /experiment/1) with headless Chromium, and stops the server again. Needs `swanlab[dashboard]` and a
# Chromium (Debian: apt-get install -y --no-install-recommends chromium). Only local-mode runs are shown:
# `swanlab watch` does not list offline runs.
set -euo pipefail

logdir=${1:?usage: $0 SWANLOG_DIR [out.png] [port] [page]}
png=${2:-swanlab_dashboard.png}
port=${3:-5092}
page=${4:-/experiment/1}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[[ -n $browser ]] || { echo "no chromium found: apt-get install -y --no-install-recommends chromium" >&2; exit 1; }
[[ -f $logdir/runs.swanlab ]] || { echo "$logdir has no runs.swanlab: is it a local-mode run's swanlog?" >&2; exit 1; }

profile=$(mktemp -d)
swanlab watch "$logdir" --host 127.0.0.1 --port "$port" >"$profile/watch.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$profile"' EXIT

for _ in $(seq 60); do  # the server takes a few seconds to start
    if curl -fsS -o /dev/null "http://127.0.0.1:$port/" 2>/dev/null; then break; fi
    kill -0 "$server" 2>/dev/null || { cat "$profile/watch.log" >&2; exit 1; }
    sleep 1
done

# No sandbox/GPU in containers; no background traffic; virtual time lets the charts finish rendering.
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
    --disable-sync --no-first-run --user-data-dir="$profile/chromium" --hide-scrollbars \
    --window-size=1600,1000 --virtual-time-budget=15000 --screenshot="$png" \
    "http://127.0.0.1:$port$page" 2>/dev/null
echo "wrote $png"
