#!/usr/bin/env bash
# Issue #13's check, on a machine with a GPU: the test file with CUDA visible (its CUDA test runs there only), then
# the default command (CPU) and --cuda side by side on HalfCheetah-v4, whatever the tests gave.
#   bash benchmarks/gpu_check.sh [STEPS]      (STEPS per throughput run, default 200000; about 3 minutes in all)
# Writes pytest.log and throughput-gpu.{md,csv} to $OUT if set, else to benchmarks/results/.
# A machine with torch but no internet takes the missing packages as wheels in .whl/, fetched elsewhere with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 (and the
#   other manylinux tags) -d .whl gymnasium farama-notifications mujoco glfw pyopengl tyro docstring-parser shtab
#   typeguard moviepy decorator proglog python-dotenv imageio-ffmpeg
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
python3 -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; print(torch.cuda.get_device_name(0))" \
    || exit 1
python3 -m pytest -q -p no:cacheprovider test_ppo.py 2>&1 | tee "$results/pytest.log"
tests=${PIPESTATUS[0]}
python3 benchmarks/benchmark.py throughput --steps "${1:-200000}" --only ours-default ours-cuda raw-env \
    --out throughput-gpu || exit 1
[ "$results" = benchmarks/results ] || cp benchmarks/results/throughput-gpu.* "$results"/
exit "$tests"
