#!/usr/bin/env bash
# Set up one researcher and three hospital nodes on this machine, as they would be set up on a
# LAN, and start the three nodes in the background.
#
#   bash setup_nodes.sh [WORK]        (WORK defaults to ./work)
#
# Environment: PORT (the researcher's TCP port on 127.0.0.1, default 5555), MESHFL (how to run
# the CLI, default `meshfl`), PYTHON (default python3).
#
# What it makes, under WORK:
#   lab/home/             the researcher's home (keys, config.toml, store)
#   lab/data/test.csv     the researcher's own held-out patients (to score the global model)
#   hospital-X/home/      node X's home
#   hospital-X/data/      node X's CSV share (it never leaves the node; the node reads it in place)
#   hospital-X/node.log   the node's log;  hospital-X/node.pid  its process id
#
# Every step is a `meshfl` command an operator would type; only the key exchange is scripted
# (on a LAN, the keys travel by e-mail or chat: they are public, but check them by phone).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="${1:-./work}"
PORT="${PORT:-5555}"
PYTHON="${PYTHON:-python3}"
if [[ -z "${MESHFL:-}" ]]; then
    if command -v meshfl >/dev/null 2>&1; then MESHFL=meshfl; else MESHFL="$PYTHON -m meshfl.cli"; fi
fi
SITES=(hospital-a hospital-b hospital-c)

# the `card` field of `meshfl peer id --json`
card_of() {
    $MESHFL peer id --home "$1" --json | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["card"])'
}

mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
for dir in lab "${SITES[@]}"; do
    if [[ -e "$WORK/$dir" ]]; then
        echo "setup_nodes.sh: $WORK/$dir exists already; use another folder or remove it" >&2
        exit 1
    fi
done

echo "== researcher: a home that listens on tcp://127.0.0.1:$PORT"
$MESHFL init --home "$WORK/lab/home" --role researcher --name lab \
    --listen "tcp://127.0.0.1:$PORT" --json >/dev/null
"$PYTHON" "$HERE/prepare_data.py" "$WORK/lab/data" --test
LAB_CARD="$(card_of "$WORK/lab/home")"

for i in "${!SITES[@]}"; do
    site="${SITES[$i]}"
    home="$WORK/$site/home"
    echo "== $site"
    # 1. the operator creates the node's home: it makes the node's keys
    $MESHFL init --home "$home" --role node --name "$site" --json >/dev/null
    # 2. key exchange: the node trusts the researcher's key and dials its endpoint ...
    $MESHFL peer trust --home "$home" --name lab --key "$LAB_CARD" \
        --endpoint "tcp://127.0.0.1:$PORT"
    # ... and the researcher trusts the node's key (a researcher needs no endpoint for its nodes)
    $MESHFL peer trust --home "$WORK/lab/home" --key "$(card_of "$home")"
    # 3. the hospital's data: its CSV share, registered in place under tags researchers search by
    "$PYTHON" "$HERE/prepare_data.py" "$WORK/$site/data" --site "$i"
    $MESHFL dataset add --home "$home" --name breast-cancer --tags breast-cancer,tabular \
        --format csv --path "$WORK/$site/data/site$i.csv" --target target \
        --description "Wisconsin diagnostic breast cancer, this hospital's patients" --json >/dev/null
    $MESHFL dataset list --home "$home"
done

echo "== the hospitals trust each other's keys (secure aggregation seals shares node to node)"
for site in "${SITES[@]}"; do
    for other in "${SITES[@]}"; do
        [[ "$site" == "$other" ]] || $MESHFL peer trust --home "$WORK/$site/home" --key "$(card_of "$WORK/$other/home")" >/dev/null
    done
done

echo "== starting the nodes"
for site in "${SITES[@]}"; do
    # -v: info-level log. The node dials the researcher and keeps retrying until it answers.
    $MESHFL -v node start --home "$WORK/$site/home" >"$WORK/$site/node.log" 2>&1 &
    echo $! >"$WORK/$site/node.pid"
    echo "$site: pid $(cat "$WORK/$site/node.pid"), log $WORK/$site/node.log"
done
sleep 2
for site in "${SITES[@]}"; do
    if ! kill -0 "$(cat "$WORK/$site/node.pid")" 2>/dev/null; then
        echo "setup_nodes.sh: the $site node exited; its log:" >&2
        cat "$WORK/$site/node.log" >&2
        exit 1
    fi
done
echo "== three nodes running; stop them with: bash $HERE/stop_nodes.sh $WORK"
