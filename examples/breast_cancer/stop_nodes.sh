#!/usr/bin/env bash
# Stop the nodes setup_nodes.sh started: SIGTERM (a clean stop: the node finishes its
# bookkeeping, stops its training worker and closes its store), then SIGKILL after a grace period
# if one does not exit. Safe to run twice.
#
#   bash stop_nodes.sh [WORK]         (WORK defaults to ./work)
set -uo pipefail

WORK="${1:-./work}"
GRACE="${GRACE:-30}"  # seconds to wait for a clean exit

for pidfile in "$WORK"/hospital-*/node.pid; do
    [[ -f "$pidfile" ]] || continue
    pid="$(cat "$pidfile")"
    # only signal the process if it still is a meshfl node (a pid can be reused after a reboot)
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null \
            && ps -o args= -p "$pid" | grep -q "node start"; then
        kill -TERM "$pid"
        for ((t = 0; t < GRACE * 10; t++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "node $pid did not stop in ${GRACE}s: killing it" >&2
            kill -KILL "$pid" 2>/dev/null
        fi
        echo "stopped node $(basename "$(dirname "$pidfile")") (pid $pid)"
    fi
    rm -f "$pidfile"
done
