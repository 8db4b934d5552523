#!/usr/bin/env bash
# The whole example, end to end, on this machine:
#   1. setup_nodes.sh: researcher + three hospital homes, key exchange, data, nodes started;
#   2. train.py (the researcher) submits the plan and waits for the operators;
#   3. each operator reviews the pending plan and approves its hash with the CLI;
#   4. train.py trains 10 FedAvg rounds and prints the history;
#   4b. analyze.py: federated statistics (in the clear and under secure aggregation), then a
#       second plan, approved the same way, trained on features standardised with them;
#   4c. train_sklearn.py: a scikit-learn SGDClassifier plan, approved the same way, federated;
#   5. the nodes are stopped (SIGTERM), their audit logs verified, and WORK is removed.
#
#   bash run_all.sh [WORK]     (default ./work; KEEP=1 keeps the homes and logs afterwards)
#
# A free port on 127.0.0.1 is picked unless PORT is set. Exits 0 only if everything worked.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="${1:-./work}"
PYTHON="${PYTHON:-python3}"
if [[ -z "${MESHFL:-}" ]]; then
    if command -v meshfl >/dev/null 2>&1; then MESHFL=meshfl; else MESHFL="$PYTHON -m meshfl.cli"; fi
fi
export PYTHON MESHFL
SITES=(hospital-a hospital-b hospital-c)
if [[ -z "${PORT:-}" ]]; then
    PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
export PORT

mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
TRAIN_PID=""
finish() {
    status=$?
    if [[ -n "$TRAIN_PID" ]] && kill -0 "$TRAIN_PID" 2>/dev/null; then kill -TERM "$TRAIN_PID"; wait "$TRAIN_PID" || true; fi
    bash "$HERE/stop_nodes.sh" "$WORK"
    if [[ $status -ne 0 ]]; then
        echo "run_all.sh: failed (exit $status); homes and logs are kept in $WORK" >&2
    fi
}
trap finish EXIT

# 1. set up and start the nodes
bash "$HERE/setup_nodes.sh" "$WORK"

# 3. (used twice) each operator: find the pending plan, check its hash against the one the
#    researcher's script sent (here: the file it wrote; in real life, an e-mail), review, approve.
approve_pending() {
    for site in "${SITES[@]}"; do
        home="$WORK/$site/home"
        digest=""
        for ((t = 0; t < 1200; t++)); do
            if [[ -s "$WORK/lab/plan.sha256" ]]; then
                expected="$(cat "$WORK/lab/plan.sha256")"
                pending="$($MESHFL plan list --home "$home" --status pending --json)"
                if [[ "$pending" == *"\"$expected\""* ]]; then
                    digest="$expected"
                    break
                fi
            fi
            kill -0 "$TRAIN_PID" 2>/dev/null || { echo "run_all.sh: the researcher's script exited early" >&2; exit 1; }
            sleep 0.25
        done
        [[ -n "$digest" ]] || { echo "run_all.sh: no pending plan reached $site" >&2; exit 1; }
        echo "== operator of $site reviews the plan:"
        $MESHFL plan show "$digest" --home "$home" | sed -n '1,16p'  # details, then the start of the source
        $MESHFL plan approve "$digest" --home "$home" --by "operator of $site"
    done
}

# 2. the researcher: submits the plan, then waits for approval before training (4.)
"$PYTHON" "$HERE/train.py" --work "$WORK" &
TRAIN_PID=$!
approve_pending
wait "$TRAIN_PID"
TRAIN_PID=""

# 4b. analytics, then training on federated-standardised features: a second plan to approve
rm -f "$WORK/lab/plan.sha256"
"$PYTHON" "$HERE/analyze.py" --work "$WORK" &
TRAIN_PID=$!
approve_pending
wait "$TRAIN_PID"
TRAIN_PID=""

# 4c. a scikit-learn plan: a third plan to approve
rm -f "$WORK/lab/plan.sha256"
"$PYTHON" "$HERE/train_sklearn.py" --work "$WORK" &
TRAIN_PID=$!
approve_pending
wait "$TRAIN_PID"
TRAIN_PID=""

# 5. stop the nodes, check their audit chains, clean up
bash "$HERE/stop_nodes.sh" "$WORK"
for site in "${SITES[@]}"; do
    echo -n "$site: "
    $MESHFL audit verify --home "$WORK/$site/home"
done
$MESHFL node status --home "$WORK/hospital-a/home"
if [[ "${KEEP:-0}" != 1 ]]; then
    rm -rf "${WORK:?}/lab" "${SITES[@]/#/$WORK/}"
    rmdir "$WORK" 2>/dev/null || true
    echo "removed the homes (KEEP=1 keeps them)"
fi
