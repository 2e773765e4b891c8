#!/usr/bin/env bash
# Issue #13's check, on a machine with a GPU: the test file with CUDA visible (its CUDA test runs there only), then
# the default command (CPU) and --cuda side by side on HalfCheetah-v4. Results land in benchmarks/results/.
#   bash benchmarks/gpu_check.sh [STEPS]      (STEPS per throughput run, default 200000)
# An offline machine that has torch but not the other packages: put their wheels in .whl/ first (Python 3.12):
#   pip download --only-binary=:all: --python-version 3.12 -d .whl gymnasium[mujoco] tyro tensorboard pytest
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; print(torch.cuda.get_device_name(0))"
python3 -m pytest -q -x test_ppo.py
python3 benchmarks/benchmark.py throughput --steps "${1:-200000}" --only ours-default ours-cuda raw-env
