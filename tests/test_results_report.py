"""Run folders are atomic and never overwritten; the report tabulates them."""

from __future__ import annotations

import json

import pytest

from adbench.errors import AdbenchError
from adbench.report import build_report, metric_table
from adbench.results import load_results, results_frame, write_run


def fake(model="fastflow", dataset="mtd", category="mtd", seed=0, auroc=0.9, backbone="tf_efficientnet_lite0",
         speed=5.0, device=None):
    m = {"image_auroc": auroc, "pixel_auroc": 0.8, "image_aupr": 0.7, "pixel_aupr": 0.3, "aupro": 0.6}
    return {"model": model, "dataset": dataset, "category": category, "seed": seed, "backbone": backbone,
            "image_size": 256, "metrics": m, "timing": {"fit_s": 10.0, "test_images_per_s": speed},
            "device": device or {"type": "cpu", "cpu": "x86_64", "threads": 2}}


def put(tmp_path, **kw):
    r = fake(**kw)
    return write_run(tmp_path, f"{r['model']}_{r['category']}_s{r['seed']}", {"result.json": json.dumps(r)})


def test_write_run_never_overwrites(tmp_path):
    a = put(tmp_path)
    b = put(tmp_path, auroc=0.5)
    assert a.name == "fastflow_mtd_s0" and b.name == "fastflow_mtd_s0-1"
    assert json.loads((a / "result.json").read_text())["metrics"]["image_auroc"] == 0.9
    assert not [p for p in (tmp_path / "runs").iterdir() if p.name.startswith(".tmp")]


def test_load_skips_temporary_and_broken(tmp_path):
    put(tmp_path)
    (tmp_path / "runs" / ".tmp-x").mkdir()
    (tmp_path / "runs" / ".tmp-x" / "result.json").write_text(json.dumps(fake()))
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "result.json").write_text("{")
    assert len(load_results(tmp_path)) == 1


def test_metric_table_mean_rows_and_seeds(tmp_path):
    for seed, (a, b) in enumerate([(0.9, 0.7), (0.8, 0.6)]):
        put(tmp_path, dataset="mvtec", category="bottle", seed=seed, auroc=a)
        put(tmp_path, dataset="mvtec", category="cable", seed=seed, auroc=b)
    put(tmp_path, model="cflow", dataset="mvtec", category="bottle", auroc=1.0)
    table = metric_table(results_frame(load_results(tmp_path)), "image_auroc")
    rows = {r.category: r for r in table.itertuples()}
    assert rows["bottle"].fastflow == "85.0 ± 7.1" and rows["cable"].fastflow == "65.0 ± 7.1"
    assert rows["**mean**"].fastflow == "75.0 ± 7.1"  # per-seed means 80 and 70
    assert rows["cable"].cflow == "–" and rows["**mean**"].cflow.endswith("(incomplete)")


def test_report_markdown_and_empty(tmp_path):
    put(tmp_path)
    text = build_report(tmp_path)
    assert "## Image AUROC (%)" in text and "| mtd       | mtd        | 90.0       |" in text
    assert "## AUPRO" in text and "test images/s" in text
    with pytest.raises(AdbenchError, match="no runs found"):
        build_report(tmp_path / "empty")


def test_several_settings_of_one_model_get_separate_columns(tmp_path):
    put(tmp_path)
    put(tmp_path, backbone="resnet18")
    table = metric_table(results_frame(load_results(tmp_path)), "image_auroc")
    assert "fastflow (resnet18@256)" in table.columns and "fastflow (tf_efficientnet_lite0@256)" in table.columns


def test_different_configs_never_share_a_column_and_partial_seeds_are_flagged(tmp_path):
    r = fake()
    write_run(tmp_path, "a", {"result.json": json.dumps({**r, "config": {"epochs": 20}})})
    write_run(tmp_path, "b", {"result.json": json.dumps({**r, "config": {"epochs": 500}, "metrics": {
        **r["metrics"], "image_auroc": 0.5}})})
    table = metric_table(results_frame(load_results(tmp_path)), "image_auroc")
    assert len(table.columns) == 4 and not any("±" in str(v) for v in table.iloc[0])
    for seed, cats in ((0, ("a", "b")), (1, ("a",))):
        for c in cats:
            put(tmp_path / "s", category=c, seed=seed)
    table = metric_table(results_frame(load_results(tmp_path / "s")), "image_auroc")
    assert table.iloc[-1].fastflow.endswith("(incomplete)")


def test_speeds_from_different_devices_are_never_averaged(tmp_path):
    put(tmp_path, seed=0, speed=1000.0, device={"type": "cuda", "name": "NVIDIA H200", "threads": 16})
    put(tmp_path, seed=1, speed=1200.0, device={"type": "cuda", "name": "NVIDIA H200", "threads": 16})
    put(tmp_path, seed=2, speed=20.0)
    text = build_report(tmp_path)
    gpu = text.split("## Speed: test images/s, NVIDIA H200")[1].split("##")[0]
    cpu = text.split("## Speed: test images/s, CPU (2 threads)")[1].split("##")[0]
    assert "1100.0 ± 141.4" in gpu and "20.0" not in gpu
    assert "| 20.0 " in cpu and "1100" not in cpu
    assert text.index("NVIDIA H200") < text.index("CPU (2 threads)")  # the device most runs used comes first
    assert "90.0 ± 0.0" in text.split("## Image AUROC")[1].split("##")[0]


def test_settings_section_says_what_differs_between_a_models_columns(tmp_path):
    for seed, lr in ((0, 1e-3), (1, 1e-4)):
        r = {**fake(seed=seed), "config": {"lr": lr, "epochs": 3}}
        write_run(tmp_path, f"fastflow_mtd_s{seed}", {"result.json": json.dumps(r)})
    put(tmp_path, model="cflow")
    section = build_report(tmp_path).split("## Settings")[1].split("##")[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("- ")]
    assert len(lines) == 2 and all("**fastflow**" in ln for ln in lines)  # cflow has one setting: not listed
    assert sorted(ln.split(": ")[1] for ln in lines) == ["lr=0.0001", "lr=0.001"]  # epochs is the same: not shown
