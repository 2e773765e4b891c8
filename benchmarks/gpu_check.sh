#!/usr/bin/env bash
# The check for a lent machine with a GPU and many cores (issue #26), in one go, quickest measurements first:
#   1. the default command (CPU) and --cuda side by side on HalfCheetah-v4   -> throughput-gpu.{md,csv}
#   2. the default command on 1, 2, 4, 8 and 16 torchrun ranks, the same steps per rank  -> scaling.{md,csv}
#   3. one gradient all-reduce between 2, 4, 8 and 16 ranks                  -> exchange-<ranks>.md
#   4. the test file with CUDA visible (its CUDA test runs there only)       -> pytest.log
#   bash benchmarks/gpu_check.sh [STEPS] [STEPS_PER_RANK]    (defaults 200000 and 100000)
# Writes to $OUT if set, else to benchmarks/results/; exits with the tests' status (1 at once if no GPU is visible).
# DRY_RUN=1 tries the script on a machine without a GPU first, so the lent machine's minutes go to measuring: no
# GPU needed, no --cuda run, 20,000 steps, ranks 1 and 2, and of the test file only its CUDA test (skipped there).
# A machine with torch but no internet takes the missing packages as wheels in .whl/, fetched elsewhere with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 (and the
#   other manylinux tags) -d .whl gymnasium farama-notifications mujoco glfw pyopengl tyro docstring-parser shtab
#   typeguard moviepy decorator proglog python-dotenv imageio-ffmpeg, and tensorboard absl-py grpcio markdown protobuf
#   tensorboard-data-server werkzeug where the machine lacks TensorBoard (the script logs to it; so does the benchmark)
# and, for the video test's headless MuJoCo, the EGL libraries as .deb files in .gl/ (libegl1 libglvnd0 libopengl0).
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".gl/*.deb" > /dev/null; then
    for deb in .gl/*.deb; do dpkg -x "$deb" /; done
    ldconfig
fi
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
results=${OUT:-benchmarks/results}
mkdir -p "$results"
if [ "${DRY_RUN:-0}" = 1 ]; then
    steps=20000 steps_per_rank=20000 ranks="1 2" runs="ours-default raw-env" only_tests=(-k cuda)
else
    python3 -c "import sys, torch
sys.exit('gpu_check.sh: no GPU visible (DRY_RUN=1 tries it without one)') if not torch.cuda.is_available() else None
print(torch.cuda.get_device_name(0))" || exit 1
    steps=${1:-200000} steps_per_rank=${2:-100000} ranks="1 2 4 8 16" runs="ours-default ours-cuda raw-env"
    only_tests=()
fi
# shellcheck disable=SC2086  # $runs and $ranks are lists of words
python3 benchmarks/benchmark.py throughput --steps "$steps" --only $runs --out throughput-gpu || exit 1
# shellcheck disable=SC2086
python3 benchmarks/benchmark.py scaling --steps-per-rank "$steps_per_rank" --ranks $ranks || exit 1
for n in $ranks; do
    [ "$n" -gt 1 ] && { python3 benchmarks/benchmark.py exchange --ranks "$n" --out "exchange-$n" || exit 1; }
done
[ "$results" = benchmarks/results ] || cp benchmarks/results/throughput-gpu.* benchmarks/results/scaling.* \
    benchmarks/results/exchange-*.md "$results"/
python3 -m pytest -q -p no:cacheprovider test_ppo.py "${only_tests[@]}" 2>&1 | tee "$results/pytest.log"
exit "${PIPESTATUS[0]}"
