"""Pictures: the curves behind them (same code as the metrics), per-run PNGs, report figures, and that plotting never
changes a metric."""

from __future__ import annotations

import io
import json
import math
import re
import struct
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_curve as sk_roc_curve
from typer.testing import CliRunner

from adbench import metrics as M
from adbench import plots
from adbench.cli import app
from adbench.results import load_results, results_frame, write_run
from conftest import code_now

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST = ["--image-size", "64", "--epochs", "1", "--set", "flow_steps=2"]
RUN_FIGURES = {"maps.png", "roc.png", "pro.png"}


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk of a PNG, after checking the signature; decodes it too."""
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    import matplotlib.image

    pixels = matplotlib.image.imread(io.BytesIO(data))
    assert pixels.shape[:2] == (height, width)
    assert pixels[..., :3].std() > 0.05, "blank image"
    return width, height


def case(seed: int = 0, n: int = 10, size: int = 24):
    """Test-set-like arrays: half good, half with a square defect that the map partly finds."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) >= n // 2).astype(np.int64)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(2, size - 8, 2)
        masks[i, y : y + 6, x : x + 6] = True
    maps = (rng.random((n, size, size)) + 0.8 * masks * rng.random((n, 1, 1))).astype(np.float32)
    scores = maps.max(axis=(1, 2))
    images = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    defects = ["good" if lab == 0 else "crack" for lab in labels]
    paths = [f"/data/img_{i:03d}.png" for i in range(n)]
    return images, masks, labels, defects, paths, scores, maps


# ----------------------------------------------------------------------------------------------------------------
# curves: one computation with the metrics


@pytest.mark.parametrize("ties", [False, True])
def test_roc_curve_matches_sklearn_and_auroc(ties: bool) -> None:
    rng = np.random.default_rng(1)
    labels = rng.random(200) < 0.3
    scores = rng.random(200) + 0.4 * labels
    if ties:
        scores = np.round(scores, 1)
    curve = M.roc_curve(scores, labels)
    fpr, tpr, thr = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(curve.fpr, fpr, atol=1e-15)
    np.testing.assert_allclose(curve.tpr, tpr, atol=1e-15)
    np.testing.assert_array_equal(curve.thresholds[1:], thr[1:])
    assert curve.thresholds[0] == np.inf and curve.auroc == M.auroc(scores, labels)


def test_pixel_curves_are_the_metrics() -> None:
    _, masks, labels, _, _, scores, maps = case(2)
    got = M.pixel_curves(maps, masks)
    m = M.compute_metrics(scores, labels, maps, masks)
    assert got.roc.auroc == m["pixel_auroc"] and got.pro.aupro == m["aupro"] == M.aupro(maps, masks)
    assert (got.f1, got.f1_threshold) == M.f1_max(maps, masks)
    # the drawn PRO points integrate to the printed area and stop at the limit
    assert got.pro.fpr[0] == 0.0 and got.pro.fpr[-1] == pytest.approx(0.3) and np.all(np.diff(got.pro.fpr) >= 0)
    area = np.sum(np.diff(got.pro.fpr) * (got.pro.pro[1:] + got.pro.pro[:-1])) / 2 / 0.3
    assert area == pytest.approx(got.pro.aupro, abs=1e-12)
    assert M.pro_curve(maps, masks, fpr_limit=0.5).aupro == M.aupro(maps, masks, fpr_limit=0.5)


def test_pro_curve_hand_computed() -> None:
    # the case of test_metrics.test_aupro_interpolates_at_the_limit: (0,0),(0.1,0),(0.1,0.5), cut at (0.3, 5/6)
    maps = np.array([[[0.95, 0.7, 0.7, 0.7], [0.9, 0.7, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]]])
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 1, :2] = True
    c = M.pro_curve(maps, masks)
    np.testing.assert_allclose(c.fpr, [0, 0.1, 0.1, 0.3], atol=1e-12)
    np.testing.assert_allclose(c.pro, [0, 0, 0.5, 5 / 6], atol=1e-12)
    assert c.aupro == pytest.approx(4 / 9, abs=1e-12)
    empty = M.pro_curve(maps, np.zeros_like(masks))
    assert empty.fpr.size == 0 and math.isnan(empty.aupro)


def test_thin_keeps_the_drawn_line() -> None:
    rng = np.random.default_rng(0)
    x = np.cumsum(rng.random(50_000) ** 8)
    y = np.cumsum(rng.random(50_000))
    x, y = x / x[-1], y / y[-1]
    tx, ty = plots._thin(x, y, 500)
    assert tx.size <= 502 and (tx[0], tx[-1], ty[0], ty[-1]) == (x[0], x[-1], y[0], y[-1])
    # every original point lies within 2/500 of the thinned polyline (checked along y at the same x)
    assert np.max(np.abs(np.interp(x, tx, ty) - y)) <= 2 / 500 + 1e-12


def test_telling_samples_picks_false_alarms_and_misses() -> None:
    scores = np.array([0.1, 0.9, 0.5, 0.2, 0.8, 0.3])
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert plots.telling_samples(scores, labels, per_class=2) == [1, 2, 3, 5]
    assert plots.telling_samples(scores[:3], labels[:3], per_class=2) == [1, 2]


# ----------------------------------------------------------------------------------------------------------------
# per-run figures


def test_run_figures_are_pngs_and_change_nothing() -> None:
    arrays = case(3)
    images, masks, labels, defects, paths, scores, maps = arrays
    before = M.compute_metrics(scores, labels, maps, masks)
    copies = [np.copy(a) for a in arrays]
    figs = plots.run_figures(images=images, masks=masks, labels=labels, defects=defects, paths=paths, scores=scores,
                             maps=maps, model="fastflow", title="fastflow on test/case")
    assert set(figs) == RUN_FIGURES
    for data in figs.values():
        w, h = png_size(data)
        assert 300 <= w <= 2500 and 300 <= h <= 2500
    grid_w, grid_h = png_size(figs["maps.png"])
    assert grid_h > grid_w * 0.9  # 6 rows of 5 panels
    for a, b in zip(arrays, copies, strict=True):
        np.testing.assert_array_equal(a, b)
    assert M.compute_metrics(scores, labels, maps, masks) == before
    again = plots.run_figures(images=images, masks=masks, labels=labels, defects=defects, paths=paths, scores=scores,
                              maps=maps, model="fastflow", title="fastflow on test/case")
    assert again == figs  # deterministic bytes (no timestamps)


def test_run_figures_without_defects() -> None:
    images, masks, labels, defects, paths, scores, maps = case(4, n=4)
    figs = plots.run_figures(images=images, masks=np.zeros_like(masks), labels=np.zeros_like(labels),
                             defects=["good"] * 4, paths=paths, scores=scores, maps=maps, model="cflow", title="t")
    assert set(figs) == RUN_FIGURES and all(png_size(d)[0] >= 300 for d in figs.values())


def test_detector_styles_are_fixed_and_distinct() -> None:
    from adbench.models import list_models

    styles = [plots.detector_style(m) for m in list_models()]
    assert len({s["color"] for s in styles}) == len(styles) and len({s["marker"] for s in styles}) == len(styles)
    assert plots.detector_style("fastflow") == plots.detector_style("fastflow")
    assert plots.detector_style("not-registered")["color"] in plots.PALETTE


def test_write_run_takes_bytes_and_rejects_other_types(tmp_path) -> None:
    png = b"\x89PNG\r\n\x1a\n\x00\xff binary"
    folder = write_run(tmp_path, "r", {"result.json": "{}", "maps.png": png})
    assert (folder / "maps.png").read_bytes() == png and (folder / "result.json").read_text() == "{}"
    for files in ({"a.json": 3}, {"../x.png": b"x"}, {"": "x"}):
        with pytest.raises((TypeError, ValueError)):
            write_run(tmp_path, "bad", files)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"]  # nothing else created, not even a tmp


# ----------------------------------------------------------------------------------------------------------------
# the CLI: run --save-maps / --no-save-maps, report --figures


def test_run_writes_figures_whose_areas_are_the_metrics(tmp_path, monkeypatch) -> None:
    import adbench.runner

    seen = {}
    roc_figure, pro_figure = plots._roc_figure, plots._pro_figure

    def spy_roc(image_roc, pixel_roc, style, title):
        seen.update(image=image_roc.auroc, pixel=pixel_roc.auroc)
        return roc_figure(image_roc, pixel_roc, style, title)

    def spy_pro(pro, style, title):
        seen.update(pro=pro.aupro)
        return pro_figure(pro, style, title)

    monkeypatch.setattr(plots, "_roc_figure", spy_roc)
    monkeypatch.setattr(plots, "_pro_figure", spy_pro)
    runner = CliRunner()
    base = ["run", "--category", "pattern", "--results-dir", str(tmp_path), *FAST]
    result = runner.invoke(app, base)  # 50 test images: figures by default
    assert result.exit_code == 0, result.output
    (drawn,) = (tmp_path / "runs").iterdir()
    r = json.loads((drawn / "result.json").read_text())
    assert r["figures"] == sorted(RUN_FIGURES) and "figures_error" not in r
    for name in RUN_FIGURES:
        w, h = png_size((drawn / name).read_bytes())
        assert 300 <= w <= 2500 and 300 <= h <= 2500
    m = r["metrics"]
    assert seen == {"image": m["image_auroc"], "pixel": m["pixel_auroc"], "pro": m["aupro"]}

    result = runner.invoke(app, [*base, "--no-save-maps"])
    assert result.exit_code == 0, result.output
    plain = drawn.with_name(drawn.name + "-1")
    assert sorted(p.name for p in plain.iterdir()) == ["result.json", "scores.csv"]
    r_plain = json.loads((plain / "result.json").read_text())
    assert r_plain["figures"] == [] and r_plain["metrics"] == m  # plotting changed no metric

    # --save-maps overrides the size rule; a plotting failure keeps the run, without figures, and says why
    monkeypatch.setattr(adbench.runner, "SAVE_MAPS_MAX_TEST", 10)

    def broken(**kw):
        raise RuntimeError("no ink")

    monkeypatch.setattr(plots, "run_figures", broken)
    result = runner.invoke(app, [*base, "--save-maps"])
    assert result.exit_code == 0 and "figures not drawn (RuntimeError: no ink)" in " ".join(result.output.split())
    failed = drawn.with_name(drawn.name + "-2")
    assert sorted(p.name for p in failed.iterdir()) == ["result.json", "scores.csv"]
    r_failed = json.loads((failed / "result.json").read_text())
    assert r_failed["figures"] == [] and r_failed["figures_error"] == "RuntimeError: no ink"
    assert r_failed["metrics"] == m

    # report --figures: PNGs next to the output, embedded with relative links that exist
    out = tmp_path / "rep" / "summary.md"
    result = runner.invoke(app, ["report", "--results-dir", str(tmp_path), "--output", str(out), "--figures"])
    assert result.exit_code == 0, result.output
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", out.read_text())
    assert len(links) == 7 and all((out.parent / link).is_file() for link in links)
    assert {p.name for p in out.parent.glob("*.png")} == set(links)
    for link in links:
        png_size((out.parent / link).read_bytes())


def test_report_figures_need_output(tmp_path) -> None:
    result = CliRunner().invoke(app, ["report", "--results-dir", str(tmp_path), "--figures"])
    assert result.exit_code == 1 and "--figures needs --output" in " ".join(result.output.split())


def fake(model, dataset, category, seed, auroc, speed):
    m = {"image_auroc": auroc, "pixel_auroc": 0.8, "image_aupr": 0.7, "pixel_aupr": None, "aupro": 0.6}
    return {"model": model, "dataset": dataset, "category": category, "seed": seed, "backbone": "resnet18",
            "image_size": 64, "metrics": m, "timing": {"fit_s": 10.0, "test_images_per_s": speed}, **code_now(model)}


def test_report_figures_from_many_runs(tmp_path) -> None:
    from adbench.report import build_report, category_means, dataset_summary, report_with_figures

    for seed in (0, 1):
        for cat, base in (("bottle", 0.9), ("cable", 0.7)):
            for model, shift, speed in (("fastflow", 0.0, 20.0), ("cflow", 0.05, 12.0)):
                r = fake(model, "mvtec", cat, seed, base + shift - 0.1 * seed, speed + seed)
                write_run(tmp_path, f"{model}_{cat}_{seed}", {"result.json": json.dumps(r)})
    write_run(tmp_path, "ff_mtd", {"result.json": json.dumps(fake("fastflow", "mtd", "mtd", 0, 0.81, 20.0))})
    frame = results_frame(load_results(tmp_path))
    summary = dataset_summary(frame, "image_auroc").set_index(["dataset", "column"])
    ff = summary.loc[("mvtec", "fastflow")]
    assert ff["mean"] == pytest.approx(75.0) and ff["std"] == pytest.approx(np.std([80, 70], ddof=1)) and ff["n"] == 2
    assert summary.loc[("mtd", "fastflow")]["n"] == 1 and math.isnan(summary.loc[("mtd", "fastflow")]["std"])
    heat = category_means(frame, "image_auroc")
    assert heat.loc["mvtec/bottle", "cflow"] == pytest.approx(90.0) and math.isnan(heat.loc["mtd/mtd", "cflow"])
    text, figs = report_with_figures(tmp_path, "rep")
    kinds = ("image_auroc", "pixel_auroc", "image_aupr", "pixel_aupr", "aupro", "heatmap", "speed")
    assert set(figs) == {f"rep_{k}.png" for k in kinds}
    assert all(f"]({name})" in text for name in figs)
    for data in figs.values():
        w, h = png_size(data)
        assert 300 <= w <= 3000 and 250 <= h <= 3000
    plain, none = report_with_figures(tmp_path, None)
    assert none == {} and plain == build_report(tmp_path)
    assert re.sub(r"\n!\[[^\]]*\]\([^)]*\)\n", "", text) == plain  # figures only add image lines


def test_cli_import_does_not_load_matplotlib() -> None:
    code = "import sys, adbench.cli; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_report_figures_fit_many_long_detector_labels(monkeypatch) -> None:
    """21 detector columns with labels of 100+ characters (results/sweep_mtd.md has them): every tick label and legend
    entry of each report figure lies inside the figure (the old bar chart's legend and heatmap labels were cut)."""
    drawn = []
    real_png = plots._png
    monkeypatch.setattr(plots, "_png", lambda fig: drawn.append(fig) or real_png(fig))
    columns = [f"clscnf (baseline_cnf=true, bn_stats=population, cnf_ensemble=false, position_norm=none, n={i}) "
               "[stale]" for i in range(21)]
    summary = pd.DataFrame({"dataset": "mtd", "column": columns, "model": "clscnf", "mean": 80.0, "std": 1.0, "n": 3,
                            "speed": 20.0, "speed_std": 1.0, "auroc": 80.0, "auroc_std": 1.0})
    plots.metric_bars(summary, "Image AUROC (%)")
    plots.speed_scatter(summary)
    plots.category_heatmap(pd.DataFrame([[80.0] * 21], index=["mtd/mtd"], columns=columns))
    for fig in drawn:
        renderer = fig.canvas.get_renderer()
        texts = [t for ax in fig.axes for t in ax.get_yticklabels() if t.get_text() in columns]
        texts += [t for legend in fig.legends for t in legend.get_texts()]  # the scatter's key: "1  clscnf (...)"
        assert len(texts) == 21
        for t in texts:
            box = t.get_window_extent(renderer)
            assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height, \
                (t.get_text(), box, fig.bbox)
