"""scripts/device_run.sh refuses to spend a lent GPU machine's call on incomplete data (no GPU needed to check)."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device_run.sh"


def device_run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "DEVICE_TMP": str(cwd / "machine"), "OUT": str(cwd / "out")}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_device_scripts_parse():
    for name in ("device_run.sh", "device_bundle.sh"):
        subprocess.run(["bash", "-n", str(SCRIPT.parent / name)], check=True)


def test_unknown_step_is_refused(tmp_path):
    done = device_run(tmp_path, "data1")
    assert done.returncode == 2 and "unknown step data1 (setup or run)" in done.stderr


def test_run_checks_the_file_count_against_the_bundle(tmp_path):
    half = tmp_path / ".device" / "data2" / "mtd" / "MT_Blowhole" / "a.png"
    half.parent.mkdir(parents=True)
    half.write_bytes(b"png")
    done = device_run(tmp_path, "run")  # no setup before: nothing to compare with
    assert done.returncode == 2 and "no setup on this machine: run setup first" in done.stderr
    (tmp_path / "machine" / "adbench-expected").write_text("2\n")  # what setup copies from the bundle
    done = device_run(tmp_path, "run")
    assert done.returncode == 2 and "MTD has 1 files, the bundle 2: run setup again" in done.stderr
    assert not (tmp_path / "out" / "gpu.txt").exists()  # stopped before the GPU work


def test_setup_without_its_pieces_fails(tmp_path):
    done = device_run(tmp_path, "setup")
    assert done.returncode == 1 and not (tmp_path / "machine" / "site").exists()
