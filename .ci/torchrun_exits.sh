#!/usr/bin/env bash
# Start N two-rank torchrun runs (Pendulum, a few seconds each) one after the other and count their exit codes:
# every rank must exit 0 after a completed job (a rank aborting at interpreter exit makes torchrun report failure).
#     bash .ci/torchrun_exits.sh 100
set -uo pipefail
runs=${1:-100}
script="$(cd "$(dirname "$0")/.." && pwd)/ppo_continuous.py"
scratch=$(mktemp -d)
cd "$scratch" || exit 1
declare -A count
for i in $(seq 1 "$runs"); do
    python -m torch.distributed.run --standalone --nproc-per-node=2 "$script" --env-id Pendulum-v1 --num-envs 2 \
        --num-steps 64 --total-timesteps 2048 --eval-episodes 1 > "run$i.log" 2>&1
    code=$?
    count[$code]=$(( ${count[$code]:-0} + 1 ))
    if [ "$code" != 0 ]; then echo "run $i: exit $code (log: $scratch/run$i.log)"; fi
done
for code in "${!count[@]}"; do echo "exit $code: ${count[$code]} of $runs runs"; done
