#!/usr/bin/env bash
# Runs on a lent GPU machine (the workplace's `device` tool), from the repo root, with the pieces that
# scripts/device_bundle.sh builds. Three calls on the one warm machine, each within 30 s of the last, carrying
# [".device/data1"], then [".device/data2"], then [".device/whl"]:
#   scripts/device_run.sh data1   unpack the first half of MTD into /tmp/adbench-data
#   scripts/device_run.sh data2   the second half
#   scripts/device_run.sh run [grid]  installs adbench (editable, as `make install` does), runs the GPU tests, the
#                                 MTD sweep on CUDA and the bench; what comes back is under $OUT (logs, and
#                                 results/sweep_mtd_cuda with its report and results/bench_cuda.md as one archive)
# A fresh machine forgets /tmp: if it was given back between calls, start again from data1. A sweep that outlasts
# one call resumes on the same warm machine (its finished cells are kept).
set -uo pipefail
step=${1:?usage: scripts/device_run.sh data1|data2|run}
OUT=${OUT:-/tmp/adbench-out}
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 ADBENCH_DATA=/tmp/adbench-data
case $step in
  data1|data2)
    mkdir -p /tmp/adbench-data && cp -a ".device/$step/." /tmp/adbench-data/ || exit 1
    echo "device_run: $(find /tmp/adbench-data -type f | wc -l) MTD files in /tmp/adbench-data" ;;
  run)
    n=$(find /tmp/adbench-data/mtd -type f 2>/dev/null | wc -l)
    [ "$n" -ge 2690 ] || { echo "device_run: MTD incomplete ($n files): run data1 and data2 first" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .device/whl/*.whl || exit 1
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1  # setuptools from /tmp/site
    mkdir -p "$OUT"
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
    python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
    python3 -m adbench sweep "${2:-grids/mtd.toml}" --results-dir results/sweep_mtd_cuda 2>&1 | tee "$OUT/sweep.log"
    python3 -m adbench report --results-dir results/sweep_mtd_cuda --output results/sweep_mtd_cuda.md
    python3 scripts/bench.py --device cuda --out results/bench_cuda.md 2>&1 | tee "$OUT/bench.log"
    tar czf "$OUT/sweep_mtd_cuda.tgz" results/sweep_mtd_cuda results/sweep_mtd_cuda.md results/bench_cuda.md ;;
  *) echo "device_run: unknown step $step (data1, data2 or run)" >&2; exit 2 ;;
esac
