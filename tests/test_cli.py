"""The command line, through typer's CliRunner: every README command, error lines, exit codes."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adbench.cli import app
from adbench.errors import DatasetError
from conftest import REPO, make_mvtec

runner = CliRunner()
FAST = ["--image-size", "64", "--epochs", "1", "--set", "flow_steps=2"]


def invoke(args: list[str], **kw):
    result = runner.invoke(app, args, **kw)
    return result, result.output


def test_list_commands():
    lite = [f"tf_efficientnet_lite{v}" for v in range(3)]
    for what, expected in (("models", ["fastflow"]), ("datasets", ["synthetic"]), ("backbones", lite)):
        result, out = invoke(["list", what])
        assert result.exit_code == 0 and set(expected) <= set(out.split())


def test_help_keeps_bracketed_words():
    """rich reads a bare [word] as markup and drops it: the sweep grid's sections must survive in the help."""
    result, out = invoke(["sweep", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and all(s in out for s in ("[overrides]", "[model.X]", "[vary]", "[[variant]]"))


def test_run_synthetic_writes_result_and_report(tmp_path):
    result, out = invoke(["run", "--category", "pattern", "--results-dir", str(tmp_path), *FAST])
    assert result.exit_code == 0, out
    assert "Img AUROC" in out and "pattern" in out
    (path,) = (tmp_path / "runs").glob("*/result.json")
    r = json.loads(path.read_text())
    assert path.parent.name == "fastflow_tf_efficientnet_lite0_synthetic_pattern_s0"
    assert set(r["metrics"]) == {"image_auroc", "image_aupr", "pixel_auroc", "pixel_aupr", "aupro"}
    assert all(0 <= v <= 1 for v in r["metrics"].values())
    assert r["config"]["epochs"] == 1 and r["config"]["flow_steps"] == 2 and r["image_size"] == 64
    assert r["weights"] == "offline:tf_efficientnet_lite0" and r["device"]["type"] == "cpu"
    assert r["device"]["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()  # e.g. AVX512: sets float rounding
    assert r["versions"]["torch"] and r["timing"]["test_images_per_s"] > 0 and r["n_test"] == 50
    assert (path.parent / "scores.csv").read_text().startswith("path,label,defect,score")
    # a second identical run gets its own folder and the same numbers (deterministic seeds)
    result, out = invoke(["run", "--category", "pattern", "--results-dir", str(tmp_path), *FAST])
    assert result.exit_code == 0, out
    again = json.loads((path.parent.with_name(path.parent.name + "-1") / "result.json").read_text())
    assert again["metrics"] == r["metrics"]
    result, out = invoke(["report", "--results-dir", str(tmp_path), "--output", str(tmp_path / "r.md")])
    assert result.exit_code == 0 and "## Image AUROC (%)" in out and (tmp_path / "r.md").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--model", "nope"], "error: unknown model 'nope'; valid: aeflow, cflow, clscnf, fastflow"),
        (["run", "--dataset", "nope"], "error: unknown dataset 'nope'; valid: btad, folder, mtd, mvtec, synthetic"),
        (["run", "--category", "nope"], "error: unknown synthetic category 'nope'; valid: pattern, texture, object"),
        (["run", "--set", "lrr=1"], "error: fastflow has no config field 'lrr'"),
        (["run", "--set", "oops"], "error: --set expects key=value"),
        (["run", "--backbone", "resnet9000"], "error: unknown backbone 'resnet9000'"),
        pytest.param(["run", "--device", "cuda"], "error: --device cuda asked for, but torch sees no CUDA device",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there (tests/test_gpu.py)")),
        (["run", "--dataset", "folder"], "error: dataset 'folder' needs --root DIR"),
        (["run", "--weights", "/no/such.pth"], "error: weights file not found: /no/such.pth"),
        (["report", "--results-dir", "/no/such/dir"], "error: no runs found under /no/such/dir/runs"),
        (["download", "imagenet"], "error: unknown dataset 'imagenet'"),
    ],
)
def test_errors_are_one_line(tmp_path, args, message):
    if args[0] == "run":
        args = [*args, "--results-dir", str(tmp_path)]
    result, out = invoke(args)
    assert result.exit_code == 1
    assert message in " ".join(out.split()), out
    assert "Traceback" not in out and len(out.strip().splitlines()) <= 2
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("raised, shown", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 120000000000 bytes."),
     "error: out of memory ([enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory"),
    (MemoryError(), "error: out of memory (MemoryError); try a smaller --image-size or --batch-size"),
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79 GiB of which "
                  "... If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF"),
     "error: out of memory (CUDA out of memory. Tried to allocate 20.00 GiB); try"),
    (DatasetError("image /data/[line a]/x.png is 16-bit"), "error: image /data/[line a]/x.png is 16-bit"),
])
def test_memory_and_bracketed_errors_are_one_intact_line(tmp_path, monkeypatch, raised, shown):
    """Running out of memory is one line, not a traceback; square brackets in a message (a path, torch's text) are
    printed, not read as rich markup."""
    import adbench.runner

    def fail(spec, progress=None):
        raise raised

    monkeypatch.setattr(adbench.runner, "run", fail)
    result, out = invoke(["run", "--results-dir", str(tmp_path)])
    assert result.exit_code == 1 and shown in " ".join(out.split()), out
    assert "Traceback" not in out and len(out.strip().splitlines()) <= 2 and "PYTORCH_CUDA_ALLOC_CONF" not in out


def test_a_cache_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "cache").write_text("")
    result, out = invoke(["run", "--category", "pattern", "--results-dir", str(tmp_path), "--cache-dir",
                          str(tmp_path / "cache"), *FAST])
    assert result.exit_code == 1 and "cache: it is a file, not a folder" in " ".join(out.split()), out
    assert "Traceback" not in out and not list(tmp_path.glob("runs/*/result.json"))


def test_other_runtime_errors_are_not_called_memory(tmp_path, monkeypatch):
    import adbench.runner

    def fail(spec, progress=None):
        raise RuntimeError("a bug")

    monkeypatch.setattr(adbench.runner, "run", fail)
    result, _ = invoke(["run", "--results-dir", str(tmp_path)])
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "a bug"


def test_missing_data_root_says_how_to_download(tmp_path):
    result, out = invoke(["run", "--dataset", "mtd", "--data-root", str(tmp_path), "--results-dir", str(tmp_path)])
    assert result.exit_code == 1 and "adbench download mtd" in " ".join(out.split())


def test_download_takes_run_s_data_root_and_its_old_name(tmp_path, real_data_root):
    """download's --data-root is run's (data in DATA_ROOT/<name>); --root, its first name, still works."""
    (tmp_path / "mtd").symlink_to(real_data_root / "mtd")
    for flag in ("--data-root", "--root"):
        result, out = invoke(["download", "mtd", flag, str(tmp_path)])
        assert result.exit_code == 0 and "mtd is ready at" in out and str(tmp_path / "mtd") in " ".join(out.split())


def test_nan_training_is_one_line_and_writes_nothing(tmp_path):
    result, out = invoke(["run", "--category", "pattern", "--results-dir", str(tmp_path), *FAST,
                          "--set", "lr=1e12"])
    assert result.exit_code == 1 and "loss became" in out and "no result written" in " ".join(out.split())
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/result.json"))


def test_folder_dataset_run(tmp_path):
    """A folder of the user's: its category name printed as it is (brackets are not rich markup)."""
    make_mvtec(tmp_path / "mine", categories=("[v2] widget",))
    result, out = invoke(["run", "--dataset", "folder", "--root", str(tmp_path / "mine"), "--results-dir",
                          str(tmp_path / "res"), *FAST])
    assert result.exit_code == 0, out
    assert "[v2] widget" in out
    (run,) = (tmp_path / "res" / "runs").iterdir()
    assert run.name.startswith("fastflow_") and (run / "result.json").is_file()


DOCS = [REPO / "README.md", *sorted((REPO / "results").glob("*.md"))]  # the README and the results files it links to


def readme_lines(prefix: str) -> list[str]:
    """Distinct command lines starting with ``prefix`` inside the shell code blocks of the README and results/*.md."""
    text = "\n".join(doc.read_text() for doc in DOCS)
    blocks = re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.S)
    lines = [ln.strip().removeprefix("$ ") for b in blocks for ln in b.splitlines()]
    return list(dict.fromkeys(ln for ln in lines if ln.startswith(prefix)))


def readme_commands() -> list[str]:
    return readme_lines("adbench ")


def test_readme_has_no_untested_commands():
    text = "\n".join(doc.read_text() for doc in DOCS)
    blocks = re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.S)
    lines = {ln.strip() for b in blocks for ln in b.splitlines() if ln.strip() and not ln.strip().startswith("#")}
    tested = set(readme_commands()) | set(readme_lines("python scripts/")) | {
        ln for ln in lines if ln.startswith("make ")}  # make demo/test: run by CI and the closing check
    assert lines <= tested, lines - tested


def test_readme_shows_commands():
    cmds = readme_commands()
    assert any(c.startswith("adbench run") for c in cmds) and any(c.startswith("adbench report") for c in cmds)


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs(command, tmp_path, real_data_root, monkeypatch):
    """Each README command, with its placeholders filled and (for training) a short schedule appended."""
    monkeypatch.chdir(tmp_path)
    make_mvtec(tmp_path / "my_images", categories=("widget",))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mtd").symlink_to(real_data_root / "mtd")
    args = shlex.split(command.replace("DIR", str(tmp_path / "data")))[1:]
    if args[0] == "run":
        small = "coupling_blocks=2" if "cflow" in args or "clscnf" in args else "flow_steps=2"
        args += ["--image-size", "64", "--epochs", "1", "--set", small, "--results-dir", str(tmp_path / "results")]
        if "clscnf" in args:  # its classifier stage has its own epoch counts
            args += ["--set", "cls_frozen_epochs=1", "--set", "cls_finetune_epochs=1"]
    if args[0] == "report":
        where = args[args.index("--results-dir") + 1] if "--results-dir" in args else "results"
        invoke(["run", "--category", "texture", *FAST, "--results-dir", str(tmp_path / where)])
    if args[0] == "sweep":  # grid files are given relative to the repository
        args[1] = str(REPO / args[1])
        if "--dry-run" not in args and Path(args[1]).name != "smoke.toml":
            args[1] = shrink_grid(Path(args[1]), tmp_path / "grid.toml")
    result, out = invoke(args)
    assert result.exit_code == 0, out


def shrink_grid(path: Path, out: Path) -> str:
    """The grid with its first model, first seed and a tiny schedule (the full grid is checked by --dry-run)."""
    from adbench.sweep import tomllib  # the standard library's, or tomli on Python 3.10

    grid = tomllib.loads(path.read_text())
    model = grid["models"][0]
    small = {"clscnf": {"coupling_blocks": 2, "cls_frozen_epochs": 1, "cls_finetune_epochs": 1},
             "cflow": {"coupling_blocks": 2}}.get(model, {"flow_steps": 2})
    first = {k: v[0] for k, v in grid.get("vary", {}).items()}  # the first variant and the first varied values
    own = {k: v for k, v in grid.get("model", {}).get(model, {}).items() if k != "seeds"}
    settings = {**grid.get("overrides", {}), **own, **(grid.get("variant") or [{}])[0],
                **first, "image_size": 64, "epochs": 1, **small}
    lines = [f"models = [{json.dumps(model)}]", f"datasets = {json.dumps(grid['datasets'])}",
             f"seeds = [{grid['seeds'][0]}]", "[overrides]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    out.write_text("\n".join(lines) + "\n")
    dry, text = invoke(["sweep", str(path), "--dry-run"])
    seeds = sum(len(grid.get("model", {}).get(m, {}).get("seeds", grid["seeds"])) for m in grid["models"])
    n_cells = seeds * len(grid.get("variant") or [{}]) * math.prod(len(v) for v in grid.get("vary", {}).values())
    assert dry.exit_code == 0 and f"{n_cells} cells" in text, text
    return str(out)


@pytest.mark.parametrize("command", readme_lines("python scripts/"))
def test_readme_script_runs(command, tmp_path, real_data_root):
    """README script lines, with a tiny schedule appended (argparse keeps the last value)."""
    import os
    import subprocess
    import sys

    args = shlex.split(command)[1:]
    script = Path(args[0]).name
    args += {"epoch_sweep.py": ["--image-size", "64", "--epochs", "1,2", "--out", str(tmp_path)],
             "roofline.py": ["--image-size", "64", "--batch", "4", "--out", str(tmp_path / "roofline.md")],
             "aeflow_steps.py": ["--dataset", "synthetic", "--category", "texture", "--image-size", "64", "--epochs",
                                 "2"],
             "sync_tables.py": ["--check"]}[script]  # never writes the repository's files under test
    env = {**os.environ, "ADBENCH_DATA": str(real_data_root)}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if script == "roofline.py":
        assert "% of it" in proc.stdout and (tmp_path / "roofline.md").is_file()
        return
    if script == "sync_tables.py":
        assert "both copies match the report" in proc.stdout
        return
    if script == "aeflow_steps.py":
        epochs = [json.loads(line) for line in proc.stdout.splitlines() if '"mean_loss"' in line]
        assert [e["epoch"] for e in epochs] == [1, 2] and all(math.isfinite(e["mean_loss"]) for e in epochs)
        return
    (csv,) = tmp_path.glob("*.csv")
    assert csv.read_text().splitlines()[0].startswith("epoch,image_auroc") and len(csv.read_text().splitlines()) == 3


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "adbench", "list", "models"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "fastflow" in proc.stdout.split()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "batch_size=0"], "batch_size=0 is invalid; it must be >= 1"),
        (["--set", "lr=nan"], "lr=nan is invalid"),
        (["--set", "weight_decay=-1"], "weight_decay=-1.0 is invalid"),
        (["--seed", "-1"], "greater than or equal to 0"),
    ],
)
def test_out_of_range_values_are_one_line(tmp_path, args, message):
    result, out = invoke(["run", *args, "--results-dir", str(tmp_path)])
    assert result.exit_code in (1, 2) and message in " ".join(out.split()) and "Traceback" not in out


def test_results_dir_that_is_a_file_fails_before_training(tmp_path):
    (tmp_path / "f").write_text("x")
    result, out = invoke(["run", "--results-dir", str(tmp_path / "f"), *FAST])
    assert result.exit_code == 1 and "cannot write results into" in " ".join(out.split())
    assert "features" not in out  # failed before any work


def test_result_json_is_strict_json_and_shared(tmp_path):
    import os
    import stat

    result, _ = invoke(["run", "--category", "object", "--results-dir", str(tmp_path), *FAST])
    (folder,) = (tmp_path / "runs").iterdir()
    json.loads((folder / "result.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask


def test_run_cflow_on_synthetic_default(tmp_path):
    result, out = invoke(["run", "--model", "cflow", "--category", "texture", "--image-size", "64", "--epochs", "1",
                          "--set", "coupling_blocks=2", "--results-dir", str(tmp_path)])
    assert result.exit_code == 0, out
    (path,) = (tmp_path / "runs").glob("cflow_*_synthetic_texture_s0/result.json")
    r = json.loads(path.read_text())
    assert r["config"]["coupling_blocks"] == 2 and r["model"] == "cflow"
    assert all(0 <= v <= 1 for v in r["metrics"].values()) and r["timing"]["test_images_per_s"] > 0


def test_roofline_script_measures_every_detector(tmp_path):
    import subprocess
    import sys

    from adbench.models import list_models

    out = tmp_path / "roofline.md"
    proc = subprocess.run([sys.executable, "scripts/roofline.py", "--image-size", "64", "--batch", "2", "--out",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines()[4:]]
    names = [r[0].strip() for r in rows]
    two_paths = ("aeflow", "cflow", "fastflow")  # FrEIA's forward and the fused one, same maps
    assert names == [n for m in list_models() for n in ([f"{m} (fused)", f"{m} (FrEIA)"] if m in two_paths else [m])]
    for r in rows:
        backbone, gflop, roof, measured = (float(v) for v in r[1:5])
        assert gflop >= 0 and 0 < roof <= backbone and measured > 0, r  # a head never lifts the ceiling
        assert abs(float(r[5].strip(" %")) - 100 * measured / roof) <= 2, r  # share = measured / roofline
