"""The papers' numbers: transcription checks on the shipped CSV, and their columns in the report tables."""

from __future__ import annotations

import pandas as pd
import pytest

from adbench.errors import ConfigError
from adbench.published import add_published, load_published, sources
from conftest import code_now


@pytest.fixture(scope="module")
def published():
    return load_published()


def test_shipped_numbers_are_sourced_and_in_range(published):
    assert set(published.model) >= {"cflow", "clscnf", "fastflow", "differnet"}
    assert published.value.between(0, 100).all()
    assert (published.source.str.len() > 10).all() and (published.protocol.str.len() > 10).all()
    assert not published.duplicated(["model", "dataset", "category", "metric", "backbone"]).any()


@pytest.mark.parametrize("model, dataset, n", [("cflow", "mvtec", 15), ("clscnf", "mvtec", 15), ("clscnf", "btad", 3)])
def test_category_values_average_to_the_published_mean(published, model, dataset, n):
    """A transcription check: each metric's per-category values average to the paper's own mean row."""
    rows = published[(published.model == model) & (published.dataset == dataset)]
    for metric, group in rows.groupby("metric"):
        per_category = group[group.category != "mean"].value
        assert len(per_category) == n
        assert per_category.mean() == pytest.approx(group[group.category == "mean"].value.item(), abs=0.06), metric


def test_oh_kim_pixel_columns_are_put_right(published):
    """Their README swaps Pix AUROC and Pix AUPR in places; ours has AUROC (always the larger here) as AUROC."""
    ok = published[published.model == "clscnf"].pivot_table(index=["dataset", "category"], columns="metric",
                                                             values="value")
    assert (ok.pixel_auroc > ok.pixel_aupr).all()
    assert ok.loc[("mvtec", "mean")].to_dict() == pytest.approx(
        {"image_auroc": 98.09, "pixel_auroc": 98.59, "pixel_aupr": 72.09, "aupro": 95.69})
    assert ok.loc[("btad", "mean")].to_dict() == pytest.approx(
        {"image_auroc": 95.97, "pixel_auroc": 97.12, "pixel_aupr": 53.76, "aupro": 72.66})


def test_paper_columns_and_differences():
    table = pd.DataFrame({"dataset": ["mvtec", "mvtec", "mvtec", "mtd"],
                          "category": ["bottle", "cable", "**mean**", "mtd"],
                          "cflow": ["97.0 ± 1.0", "–", "90.0 (incomplete)", "84.1"],
                          "fastflow": ["99.0", "98.0", "98.5", "81.4"],
                          "cflow [stale]": ["96.0", "–", "–", "–"]})  # a column of other detector code: its Δ too
    pub = pd.DataFrame([
        ["cflow", "mvtec", "bottle", "pixel_auroc", 98.98, "wrn50", "256", "best epoch", "paper T3"],
        ["cflow", "mvtec", "mean", "pixel_auroc", 98.62, "wrn50", "256", "best epoch", "paper T3"],
        ["differnet", "mtd", "mtd", "pixel_auroc", 50.0, "alexnet", "448", "best", "paper"],
        ["cflow", "btad", "01", "pixel_auroc", 90.0, "wrn50", "256", "best", "not shown: no btad rows"],
        ["cflow", "mvtec", "bottle", "image_auroc", 100.0, "wrn50", "256", "best", "another metric"],
    ], columns=["model", "dataset", "category", "metric", "value", "backbone", "image_size", "protocol", "source"])
    out = add_published(table, "pixel_auroc", pub)
    assert list(out.columns) == ["dataset", "category", "cflow", "fastflow", "cflow [stale]", "cflow (paper)",
                                 "Δ cflow", "Δ cflow [stale]", "differnet (paper)"]
    assert list(out["cflow (paper)"]) == ["99.0", "–", "98.6", "–"]
    assert list(out["Δ cflow"]) == ["-2.0", "–", "-8.6", "–"] and out["Δ cflow [stale]"][0] == "-3.0"
    assert list(out["differnet (paper)"]) == ["–", "–", "–", "50.0"]
    assert "paper T3" in sources(pub, {"mvtec"}) and "not shown" not in sources(pub, {"mvtec"})


def test_bad_published_file_is_a_config_error(tmp_path):
    (tmp_path / "x.csv").write_text("model,dataset\ncflow,mvtec\n")
    with pytest.raises(ConfigError, match="lack column"):
        load_published(tmp_path)
    (tmp_path / "empty").mkdir()
    assert load_published(tmp_path / "empty").empty
    with pytest.raises(ConfigError, match="published numbers folder not found: .*nothing"):  # a typo, not "none"
        load_published(tmp_path / "nothing")


def test_report_shows_paper_columns_and_failed_cells(tmp_path):
    """Through the CLI: our MTD-like run beside DifferNet's published number, and a failed cell listed."""
    import json

    from typer.testing import CliRunner

    from adbench.cli import app

    res = tmp_path / "res"
    run = res / "runs" / "cflow_resnet18_mtd_mtd_s0"
    run.mkdir(parents=True)
    metrics = {"image_auroc": 0.841, "pixel_auroc": 0.78, "image_aupr": 0.9, "pixel_aupr": 0.2, "aupro": 0.7}
    run.joinpath("result.json").write_text(json.dumps({
        "model": "cflow", "dataset": "mtd", "category": "mtd", "backbone": "resnet18", "image_size": 64, "seed": 0,
        "config": {}, "metrics": metrics, "timing": {"fit_s": 1.0, "test_images_per_s": 5.0}, **code_now("cflow")}))
    (res / "failures").mkdir()
    (res / "failures" / "x.json").write_text(json.dumps({"name": "fastflow_resnet18_mtd_mtd_s1",
                                                          "error": "fastflow: loss became nan at epoch 2"}))
    result = CliRunner().invoke(app, ["report", "--results-dir", str(res)])
    assert result.exit_code == 0, result.output
    assert "| dataset   | category   | cflow   | differnet (paper)   |" in result.output
    assert "| mtd       | mtd        | 84.1    | 97.7                |" in result.output
    assert "Rudolph et al., DifferNet" in result.output
    assert "- `fastflow_resnet18_mtd_mtd_s1`: fastflow: loss became nan at epoch 2" in result.output
    empty = CliRunner().invoke(app, ["report", "--results-dir", str(res), "--published", str(tmp_path / "none")])
    assert "(paper)" not in empty.output and "Published numbers" not in empty.output
