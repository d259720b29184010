"""Run folders are atomic and never overwritten; the report tabulates them."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from adbench.errors import AdbenchError
from adbench.report import build_report, metric_table
from adbench.results import load_results, results_frame, unmarked, write_run
from conftest import code_now, script_module


def fake(model="fastflow", dataset="mtd", category="mtd", seed=0, auroc: float | None = 0.9,
         backbone="tf_efficientnet_lite0", speed=5.0, device=None, code: str | None = "current", **more):
    """A run's result.json; ``code``: its detector-code hash, ``current`` for this checkout's, None: not recorded."""
    if code == "current":
        code = code_now(model)["code"]["detector"]
    m = {"image_auroc": auroc, "pixel_auroc": 0.8, "image_aupr": 0.7, "pixel_aupr": 0.3, "aupro": 0.6}
    return {"model": model, "dataset": dataset, "category": category, "seed": seed, "backbone": backbone,
            "image_size": 256, "metrics": m, "timing": {"fit_s": 10.0, "test_images_per_s": speed},
            "device": device or {"type": "cpu", "cpu": "x86_64", "threads": 2},
            **({"code": {"adbench": "0.1.0", "detector": code}} if code else {}), **more}


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
    for name, text in [("broken", "{"), ("a_list", "[]"), ("no_metrics", '{"model": "padim"}'), ("bytes", b"\xff")]:
        (tmp_path / "runs" / name).mkdir()
        write = (tmp_path / "runs" / name / "result.json").write_bytes if isinstance(text, bytes) else \
            (tmp_path / "runs" / name / "result.json").write_text
        write(text)
    skipped: list[str] = []
    assert len(load_results(tmp_path, skipped)) == 1
    why = {Path(s.split(" (")[0]).parent.name: s.split(" (", 1)[1] for s in skipped}
    assert why["broken"].startswith("not valid JSON") and why["a_list"] == "a JSON list, not an object)"
    assert why["no_metrics"] == "no dataset, category, seed, metrics)" and why["bytes"].startswith("unreadable")


def test_report_refuses_a_result_it_cannot_read(tmp_path):
    """A report without a run it could not read would be silently incomplete: it names the file instead."""
    put(tmp_path)
    (tmp_path / "runs" / "odd").mkdir()
    (tmp_path / "runs" / "odd" / "result.json").write_text("[]")
    with pytest.raises(AdbenchError, match=r"not a run's result: .*odd/result.json \(a JSON list, not an object\); "
                                           r"move or delete it"):
        build_report(tmp_path)


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
    assert "fastflow (backbone=resnet18)" in table.columns
    assert "fastflow (backbone=tf_efficientnet_lite0)" in table.columns


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
    assert text.index("## Speed: fit (s), NVIDIA H200") < text.index("## Speed: fit (s), CPU")  # most runs' first
    assert "90.0 ± 0.0" in text.split("## Image AUROC")[1].split("##")[0]


def test_columns_are_named_by_the_settings_that_differ(tmp_path):
    for seed, lr in ((0, 1e-3), (1, 1e-4)):
        r = {**fake(model="clscnf", seed=seed), "config": {"cls_encoder_lr": lr, "epochs": 3}}
        write_run(tmp_path, f"clscnf_mtd_s{seed}", {"result.json": json.dumps(r)})
    write_run(tmp_path, "clscnf_old", {"result.json": json.dumps({**fake(model="clscnf"), "config": {"epochs": 3}})})
    put(tmp_path, model="cflow")
    table = metric_table(results_frame(load_results(tmp_path)), "image_auroc")
    assert list(table.columns)[2:] == ["cflow", "clscnf (cls_encoder_lr=(absent))", "clscnf (cls_encoder_lr=0.0001)",
                                       "clscnf (cls_encoder_lr=0.001)"]  # epochs is the same: not in the names


def test_a_field_that_only_follows_the_category_does_not_split_a_column(tmp_path):
    for category, weight in (("bottle", 1.0), ("cable", 0.5)):  # a per-category default, as clscnf's fusion weight
        r = {**fake(dataset="mvtec", category=category), "config": {"weight": weight}}
        write_run(tmp_path, f"fastflow_{category}_s0", {"result.json": json.dumps(r)})
    table = metric_table(results_frame(load_results(tmp_path)), "image_auroc")
    assert list(table.columns) == ["dataset", "category", "fastflow"] and table.iloc[-1].fastflow == "90.0"


def test_a_rerun_of_a_seed_replaces_it_and_is_not_a_second_seed(tmp_path):
    """Seed 0 run twice with the same settings (folders ..._s0 and ..._s0-1): one value, no spread."""
    first = put(tmp_path, auroc=0.12)
    rerun = put(tmp_path, auroc=0.605)
    assert rerun.name == first.name + "-1"
    table = metric_table(results_frame(load_results(tmp_path)), "image_auroc")
    assert table.iloc[0].fastflow == "60.5"  # the newest run, alone (before: "36.2 ± 34.3", two runs as two seeds)
    text = build_report(tmp_path)
    assert "±" not in text.split("## Image AUROC (%)")[1].split("##")[0]
    assert "1 run from" in text and "over 1 seed (0)" in text and "1 older run(s) of a seed are left out" in text
    assert f"- `{first.name}` (seed 0), replaced by `{rerun.name}`" in text.split("## Reruns")[1]


def test_newest_is_by_start_time_then_rerun_suffix(tmp_path):
    r = fake()
    write_run(tmp_path, "ff_s0", {"result.json": json.dumps({**r, "started": "2026-01-02T00:00:00+00:00"})})
    write_run(tmp_path, "ff_s0", {"result.json": json.dumps({**r, "started": "2026-01-01T00:00:00+00:00",
                                                             "metrics": {**r["metrics"], "image_auroc": 0.1}})})
    table = metric_table(results_frame(load_results(tmp_path)), "image_auroc")
    assert table.iloc[0].fastflow == "90.0"  # ff_s0-1 started earlier: ff_s0 is the newest


def test_report_counts_seeds_not_runs(tmp_path):
    for seed in (0, 1, 2):
        put(tmp_path, seed=seed, auroc=0.8 + 0.05 * seed)
    put(tmp_path, seed=2, auroc=0.9)  # a rerun of seed 2
    text = build_report(tmp_path)
    assert "3 runs from" in text and "over 3 seeds (0, 1, 2)" in text
    summary = text.split("## Summary: mtd")[1].split("##")[0]
    assert "| fastflow   | 85.0 ± 5.0  |" in summary and "| 3       |" in summary


def test_a_null_metric_is_shown_missing_not_dropped(tmp_path):
    put(tmp_path, seed=0, auroc=0.8)
    put(tmp_path, seed=1, auroc=None)
    put(tmp_path, seed=2, auroc=0.9)
    table = metric_table(results_frame(load_results(tmp_path)), "image_auroc")
    assert table.iloc[0].fastflow == "85.0 ± 7.1 (null in 1 of 3 seeds)"
    for seed in (0, 1):
        put(tmp_path / "m", dataset="mvtec", category="a", seed=seed)
        put(tmp_path / "m", dataset="mvtec", category="b", seed=seed, auroc=None if seed else 0.7)
    table = metric_table(results_frame(load_results(tmp_path / "m")), "image_auroc")
    rows = {r.category: r.fastflow for r in table.itertuples()}
    assert rows["b"] == "70.0 (null in 1 of 2 seeds)" and rows["**mean**"] == "80.0 (incomplete)"


def test_per_defect_type_image_auroc_from_scores_csv(tmp_path):
    scores = "path,label,defect,score\n" + "\n".join([
        "g1,0,good,0.1", "g2,0,good,0.2", "g3,0,good,0.6",
        "c1,1,crack,0.9", "c2,1,crack,0.8",  # above every good image: 100
        "h1,1,hole,0.15", "h2,1,hole,0.05"])  # h1 beats one of three good images, h2 none: 1/6
    for seed in (0, 1):
        r = fake(seed=seed)
        write_run(tmp_path, f"fastflow_mtd_s{seed}", {"result.json": json.dumps(r), "scores.csv": scores})
    put(tmp_path, model="cflow")  # no scores.csv
    text = build_report(tmp_path)
    section = text.split("## Image AUROC per defect type (%)")[1].split("##")[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("| mtd")]
    assert [ln.split("|")[3].strip() for ln in lines] == ["crack", "hole"]
    assert [[c.strip() for c in ln.split("|")[4:7]] for ln in lines] == [["2", "–", "100.0 ± 0.0"],
                                                                         ["2", "–", "16.7 ± 0.0"]]


def test_reference_detectors_are_marked_and_listed_last(tmp_path, monkeypatch):
    from adbench.models import MODELS

    monkeypatch.setattr(MODELS.get("aeflow"), "reference", True, raising=False)
    put(tmp_path, model="aeflow")
    put(tmp_path, model="fastflow")
    table = metric_table(results_frame(load_results(tmp_path)), "image_auroc")
    assert list(table.columns) == ["dataset", "category", "fastflow", "aeflow (reference)"]
    assert "| aeflow (reference) |" in build_report(tmp_path).split("## Summary: mtd")[1]


def test_parts_are_scored_alone_beside_the_detector(tmp_path):
    for seed, flow in ((0, 0.7), (1, 0.8)):
        r = fake(model="aeflow", seed=seed)
        r["parts"] = {"flow": {**r["metrics"], "image_auroc": flow}, "recon": {**r["metrics"], "image_auroc": None}}
        write_run(tmp_path, f"aeflow_mtd_s{seed}", {"result.json": json.dumps(r)})
    put(tmp_path, model="cflow")  # no parts: not listed
    section = build_report(tmp_path).split("## Parts scored alone (%)")[1].split("##")[0]
    rows = [[c.strip() for c in ln.split("|")[2:5]] for ln in section.splitlines() if ln.startswith("| mtd")]
    assert rows == [["aeflow", "(detector)", "90.0 ± 0.0"], ["aeflow", "flow", "75.0 ± 7.1"],
                    ["aeflow", "recon", "– (incomplete)"]]


def test_runs_of_different_detector_code_never_share_a_column_unsaid(tmp_path):
    put(tmp_path, seed=0, code="aaaaaaaaaaaa", auroc=0.9)
    put(tmp_path, seed=1, code="bbbbbbbbbbbb", auroc=0.5)
    put(tmp_path, model="cflow", seed=0, code="cccccccccccc")
    put(tmp_path, model="cflow", seed=1, code="cccccccccccc")
    text = build_report(tmp_path)
    table = metric_table(results_frame(load_results(tmp_path)), "image_auroc")
    assert list(table.columns)[2:] == ["cflow [stale]", "fastflow (code=aaaaaaaaaaaa) [stale]",
                                       "fastflow (code=bbbbbbbbbbbb) [stale]"]  # none is this checkout's code
    assert [table.iloc[0][c] for c in table.columns[3:]] == ["90.0", "50.0"]  # not 70.0 ± 28.3
    note = "Runs of one setting made by different detector code are not averaged"
    intro = text.split("\n## ")[0]
    assert note in intro and "`fastflow (code=aaaaaaaaaaaa) [stale]`, `fastflow (code=bbbbbbbbbbbb) [stale]`" in intro
    assert "`[stale]`: 4 run(s) made by other detector code" in intro
    # a run that records no code (made before adbench recorded it) is code "(absent)"; per category, too
    for category, code in (("bottle", None), ("cable", "bbbbbbbbbbbb")):
        put(tmp_path / "m", dataset="mvtec", category=category, code=code)
    table = metric_table(results_frame(load_results(tmp_path / "m")), "image_auroc")
    assert list(table.columns)[2:] == ["fastflow (code=(absent)) [code unknown]",
                                       "fastflow (code=bbbbbbbbbbbb) [stale]"]


def test_columns_not_made_by_this_checkouts_code_are_marked(tmp_path):
    """Every table names a column whose newest runs this checkout's detector code did not make; the intro says why."""
    put(tmp_path, model="cflow")  # this checkout's code: no mark
    put(tmp_path, model="padim", code="aaaaaaaaaaaa")  # a reference detector: marked before "(reference)"
    put(tmp_path, model="fastflow", code=None, seed=0)  # made before adbench recorded code
    put(tmp_path, model="fastflow", code=None, seed=1)
    old = put(tmp_path, model="aeflow", code="aaaaaaaaaaaa")  # stale, then rerun by this checkout's code: no mark
    put(tmp_path, model="aeflow")
    text = build_report(tmp_path)
    frame = results_frame(load_results(tmp_path))
    assert frame.set_index("run").code_state.to_dict() == {
        "cflow_mtd_s0": "current", "padim_mtd_s0": "stale", "fastflow_mtd_s0": "unknown", "fastflow_mtd_s1": "unknown",
        old.name: "stale", old.name + "-1": "current"}
    columns = ["aeflow", "cflow", "fastflow [code unknown]", "padim [stale] (reference)"]
    assert list(metric_table(frame, "image_auroc").columns)[2:] == columns
    assert all(f"| {c} " in text.split("## Summary: mtd")[1].split("\n## ")[0] for c in columns)
    intro = text.split("\n## ")[0]
    assert ("`[stale]`: 1 run(s) made by other detector code" in intro  # the replaced run: not counted
            and "`[code unknown]`: 2 run(s) made before adbench recorded the detector's code" in intro)
    assert f"(its code: fastflow `{code_now('fastflow')['code']['detector']}`, padim `" in intro
    put(tmp_path / "now", model="cflow")
    put(tmp_path / "now", model="mystery", code="aaaaaaaaaaaa")  # no such detector here: nothing to compare with
    frame = results_frame(load_results(tmp_path / "now"))
    assert list(frame.code_state) == ["current", "unregistered"]
    assert "Marked columns" not in build_report(tmp_path / "now")


def test_a_code_split_marks_only_the_half_of_other_code(tmp_path):
    put(tmp_path, seed=0, code="aaaaaaaaaaaa")
    put(tmp_path, seed=1)  # this checkout's code
    table = metric_table(results_frame(load_results(tmp_path)), "image_auroc")
    assert set(table.columns[2:]) == {"fastflow (code=aaaaaaaaaaaa) [stale]",
                                      f"fastflow (code={code_now('fastflow')['code']['detector']})"}


def test_a_rerun_by_new_code_replaces_the_seed(tmp_path):
    """Every seed rerun by the current code (``adbench sweep --rerun-stale``): one column, the old runs left out."""
    old = [put(tmp_path, seed=seed, code="aaaaaaaaaaaa", auroc=0.5) for seed in (0, 1)]
    new = [put(tmp_path, seed=seed, auroc=0.9) for seed in (0, 1)]  # this checkout's code
    text = build_report(tmp_path)
    table = metric_table(results_frame(load_results(tmp_path)), "image_auroc")
    assert list(table.columns)[2:] == ["fastflow"] and table.iloc[0].fastflow == "90.0 ± 0.0"
    assert "different detector code" not in text and "Marked columns" not in text
    assert f"- `{old[0].name}` (seed 0), replaced by `{new[0].name}`" in text.split("## Reruns")[1]


REPO = Path(__file__).resolve().parents[1]
IMAGE_LINE = r"\n!\[[^\]]*\]\([^)]*\)\n"  # figure lines: the only thing --figures adds to the markdown


def _tables(text: str) -> list[str]:
    """The markdown tables of a text, each as its lines joined."""
    return ["\n".join(t.strip().splitlines()) for t in re.findall(r"(?:^\|.*\|\n)+", text, flags=re.M)]


@pytest.fixture
def mtd_report(monkeypatch) -> str:
    """`adbench report --results-dir results/sweep_mtd`, run on the committed MTD runs from the repository root."""
    monkeypatch.chdir(REPO)
    return build_report(Path("results/sweep_mtd"))


def test_committed_mtd_report_is_what_its_command_writes(mtd_report):
    committed = (REPO / "results" / "sweep_mtd.md").read_text()
    assert re.sub(IMAGE_LINE, "", committed) == mtd_report, "regenerate: adbench report --results-dir " \
        "results/sweep_mtd --output results/sweep_mtd.md --figures"


@pytest.mark.parametrize("runs, report", [("sweep_mtd_validation", "sweep_mtd_validation.md"),
                                          ("sweep_mtd_ablation", "ablation_mtd.md"),
                                          ("sweep_mtd_aeflow", "sweep_mtd_aeflow.md")])
def test_other_committed_reports_are_what_their_commands_write(monkeypatch, runs, report):
    """Their marks of other detector code included: a detector edit is seen in every committed report."""
    monkeypatch.chdir(REPO)
    assert (REPO / "results" / report).read_text() == build_report(Path("results") / runs), \
        f"regenerate: adbench report --results-dir results/{runs} --output results/{report}"


def test_readme_mtd_table_is_the_reports_summary_at_the_readmes_commands(mtd_report, real_data_root, monkeypatch):
    """The README's MTD table: the report's summary rows of the runs its `adbench sweep` commands stand on (the
    newest run of each of their grids' cells), every other row left to results/sweep_mtd.md."""
    monkeypatch.setenv("ADBENCH_DATA", str(real_data_root))
    sync = script_module("sync_tables")
    current_detectors, current_rows = sync.current_detectors, sync.current_rows
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- results:mtd:begin")[1].split("<!-- results:mtd:end -->")[0]
    (summary,) = _tables(mtd_report.split("## Summary: mtd")[1].split("\n## ")[0])
    current = current_detectors(readme, REPO / "results" / "sweep_mtd")
    assert {"padim (reference)", "patchcore (reference)"} < {unmarked(c) for c in current}
    assert _tables(block) == [current_rows(summary + "\n", current).strip()]
    assert len(_tables(block)[0].splitlines()) == 2 + len(current) < len(summary.splitlines())


def test_sync_tables_without_mtd_says_so_in_one_line_and_writes_nothing(tmp_path):
    import os
    import subprocess

    before = (REPO / "README.md").read_text()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "sync_tables.py")], capture_output=True, text=True,
                          env={**os.environ, "ADBENCH_DATA": str(tmp_path)}, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: mtd not found at"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and (REPO / "README.md").read_text() == before


def test_current_rows_keep_the_header_and_the_named_detectors():
    current_rows = script_module("sync_tables").current_rows
    table = "| detector | x |\n|:--|:--|\n| a (s=1) | 1 |\n| a (s=2) | 2 |\n| b | 3 |\n"
    assert current_rows(table, {"a (s=2)", "b"}) == "| detector | x |\n|:--|:--|\n| a (s=2) | 2 |\n| b | 3 |\n"
    # a detector whose label the report does not have (written before its runs or a code change): sync stops
    assert script_module("sync_tables").missing_rows(table, {"b", "b [stale]", "a (s=2)"}) == ["b [stale]"]


def test_ablation_tables_are_the_reports_parts_table(mtd_report):
    (table,) = _tables((REPO / "results" / "ablations.md").read_text())
    assert table in _tables(mtd_report.split("## Parts scored alone (%)")[1].split("\n## ")[0])


def test_epoch_sweep_tables_are_what_the_script_prints_from_its_csvs():
    import pandas as pd

    markdown = script_module("epoch_sweep").markdown
    expected = [markdown(pd.read_csv(REPO / "results" / "sweeps" / f"{m}_tf_efficientnet_lite0_mtd_256_s0.csv"))
                for m in ("fastflow", "cflow")]
    assert _tables((REPO / "results" / "epoch_sweeps.md").read_text()) == [t.strip() for t in expected]


def test_settings_chosen_in_fit_are_reported_per_run(tmp_path):
    """A detector's own held-out choice (result ``selection``, e.g. CLS+CNF's fusion weight) gets a row per seed."""
    sel = {"fusion": {"how": "validation: ...", "weight": 0.3, "scaling": "standardised", "image_auroc": 0.91,
                      "alone": {"cnf": 0.88, "classifier": 0.7}}}
    for seed, w in ((0, 0.3), (1, 2.0)):
        put(tmp_path, model="clscnf", seed=seed, selection={"fusion": {**sel["fusion"], "weight": w}})
    put(tmp_path, model="cflow", seed=0)
    text = build_report(tmp_path)
    section = text.split("## Settings chosen on held-out training images")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| mtd")]
    assert len(rows) == 2 and "w = 0.3, standardised" in rows[0] and "w = 2, standardised" in rows[1]
    assert "91.0" in rows[0] and "cnf 88.0, classifier 70.0" in rows[0] and "| validation" in rows[0]
    assert "cflow" not in section


def test_label_names_the_setting_before_the_feature_precision(tmp_path):
    """Two groups apart in a detector setting and in feature precision alike: the label names the setting (the
    ``ran on`` column shows the precision); with the setting equal, the precision tells them apart."""
    gpu = {"type": "cuda", "name": "NVIDIA H200", "threads": 16, "feature_precision": "fp16"}
    put(tmp_path, seed=0, device=gpu, config={"layers": [1, 2, 3]})
    put(tmp_path, seed=0, device={"type": "cpu", "cpu": "x86_64", "threads": 2, "feature_precision": "fp32"},
        config={"layers": [2, 3, 4]})
    put(tmp_path, model="cflow", seed=0, device=gpu, config={"layers": [2, 3, 4]})
    put(tmp_path, model="cflow", seed=0, device={"type": "cpu", "cpu": "x86_64", "threads": 2,
                                                 "feature_precision": "fp32"}, config={"layers": [2, 3, 4]})
    summary = build_report(tmp_path).split("## Summary")[1]
    assert "fastflow (layers=[1, 2, 3])" in summary and "fastflow (layers=[2, 3, 4])" in summary
    assert "cflow (features=fp16)" in summary and "cflow (features=fp32)" in summary


def test_an_integer_of_a_float_field_is_the_same_setting(tmp_path):
    """A grid's ``map_blur = [0, 4]`` records 0 where runs made before the field record its default 0.0: one setting,
    one column, the newer run replacing the older; new runs get the field's type from the config resolution."""
    from adbench.models import resolve_config

    older = {**fake(model="cflow", auroc=0.5), "config": {"map_blur": 0.0, "position_norm": "gaussian"}}
    newer = {**fake(model="cflow", auroc=0.6), "config": {"map_blur": 0, "position_norm": "gaussian"}}
    blurred = {**fake(model="cflow", auroc=0.7), "config": {"map_blur": 4, "position_norm": "gaussian"}}
    for name, r in (("a", older), ("b", newer), ("c", blurred)):
        write_run(tmp_path, f"cflow_mtd_s0_{name}", {"result.json": json.dumps({**r, "started": name})})
    table = metric_table(results_frame(load_results(tmp_path)), "image_auroc")
    assert list(table.columns)[2:] == ["cflow (map_blur=0.0)", "cflow (map_blur=4.0)"]
    assert resolve_config("cflow", "resnet18", {"map_blur": 4}).map_blur == 4.0
    assert type(resolve_config("cflow", "resnet18", {"map_blur": 4}).map_blur) is float
    assert type(resolve_config("cflow", "resnet18", {"epochs": 4}).epochs) is int
    grid = resolve_config("clscnf", "resnet18", {"fusion_grid": [0, 1, 5]}).fusion_grid
    assert grid == resolve_config("clscnf", "resnet18", {"fusion_grid": "0,1,5"}).fusion_grid == (0.0, 1.0, 5.0)
    assert all(type(w) is float for w in grid)
    assert table.iloc[0]["cflow (map_blur=0.0)"] == "60.0"  # the newer of the two runs of that setting
