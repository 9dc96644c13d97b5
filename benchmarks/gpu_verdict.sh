#!/usr/bin/env bash
# The issue-27 device check, ONE GPU, one call. Locally, in the repository root, first
# `cp -r /work/shared/device-kit device-kit` (untracked, travels with the tree); then on the device:
#   BUDGET_S=360 bash benchmarks/gpu_verdict.sh          (device tool timeout_s ~480)
# Installs device-kit/wheels (Ray 2.60 + torch_pruning) into /tmp when ray or torch_pruning is
# missing, then runs benchmarks/gpu_verdict.py within BUDGET_S seconds; rows land in
# $OUT/results.jsonl as they are measured, the table in $OUT/gpu_verdict.md and printed last.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIT="${KIT:-$ROOT/device-kit}"
O="${OUT:-/tmp/ccpcsa-gpu-verdict-out}"; mkdir -p "$O"
PY="${PYTHON:-python3}"; DEPS=/tmp/ccpcsa-pydeps; B="${BUDGET_S:-360}"; t0=$(date +%s)
if ! "$PY" -c "import ray, torch_pruning" 2>/dev/null; then
  if compgen -G "$KIT/wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target "$DEPS" "$KIT"/wheels/*.whl \
      >"$O/pip.txt" 2>&1 || echo "warning: wheels did not install (pip.txt)"
  else echo "warning: no $KIT/wheels: ray may be missing"; fi
fi
export PYTHONPATH="$ROOT:$DEPS${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export RAY_USAGE_STATS_ENABLED=0; unset RAY_ADDRESS   # a private local Ray instance
echo "setup $(( $(date +%s) - t0 ))s; $(nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader 2>/dev/null || echo no nvidia-smi)"
left=$(( B - ($(date +%s) - t0) ))
cd "$ROOT" && timeout -k 10 $(( left + 60 )) "$PY" benchmarks/gpu_verdict.py --out "$O" \
  --budget-s "$left" "$@" 2>"$O/stderr.txt" | grep -v '^{' 
rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && tail -n 20 "$O/stderr.txt"
[ -f "$O/gpu_verdict.md" ] || { echo "no table; rows so far:"; cat "$O/results.jsonl" 2>/dev/null; }
echo "rc=$rc total $(( $(date +%s) - t0 ))s; files in $O: $(ls "$O" | tr '\n' ' ')"
exit "$rc"
