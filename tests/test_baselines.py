"""PaDiM and PatchCore, the reference (non-flow) baselines: shapes, determinism, their closed-form fits, the exact
coreset, and a planted defect scoring above every good image."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from adbench.errors import ConfigError
from adbench.features import FeatureStore, create_extractor
from adbench.models import create_model, resolve_config
from adbench.models.padim import embed
from adbench.models.patchcore import greedy_coreset, nearest, nearest_distances, principal_axes

SIZE = 64


def _images(n: int, seed: int, defect: bool = False) -> torch.Tensor:
    """A fixed smooth texture plus fresh noise per image; ``defect`` plants a bright square somewhere."""
    base = F.interpolate(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)), size=SIZE,
                         mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    x = (0.25 + 0.5 * base + 0.04 * torch.randn(n, 3, SIZE, SIZE, generator=g)).clamp(0, 1)
    if defect:
        for i in range(n):
            y0, x0 = (int(v) for v in torch.randint(8, SIZE - 20, (2,), generator=g))
            x[i, :, y0 : y0 + 12, x0 : x0 + 12] = 1.0
    return (x * 255).round().to(torch.uint8)


def _fitted(model: str, overrides: dict | None = None, seed: int = 0):
    cfg = resolve_config(model, "tf_efficientnet_lite0", overrides or {})
    ext = create_extractor("tf_efficientnet_lite0", cfg.layers)
    torch.manual_seed(seed)
    det = create_model(model, ext, SIZE, cfg)
    det.fit(FeatureStore(ext(_images(12, seed=1))))
    return det


@pytest.fixture(scope="module")
def padim():
    return _fitted("padim")


@pytest.fixture(scope="module")
def patchcore():
    return _fitted("patchcore")


def test_defaults_from_the_papers():
    p = resolve_config("padim", "tf_efficientnet_lite0")
    assert (p.layers, p.n_features, p.epsilon, p.sigma) == ((1, 2, 3), 100, 0.01, 4.0)
    assert resolve_config("padim", "wide_resnet50_2").n_features == 550
    c = resolve_config("patchcore", "tf_efficientnet_lite0")
    assert (c.layers, c.patch_size, c.coreset_ratio, c.projection_dim, c.neighbours, c.sigma) == (
        (2, 3), 3, 0.1, 128, 9, 4.0)
    with pytest.raises(ConfigError, match="padim has no config field 'epochs'"):
        resolve_config("padim", "tf_efficientnet_lite0", {"epochs": 1})
    with pytest.raises(ConfigError, match="coreset_ratio must be in"):
        resolve_config("patchcore", "tf_efficientnet_lite0", {"coreset_ratio": 0})


@pytest.mark.parametrize("model", ["padim", "patchcore"])
def test_shapes_and_a_planted_defect_scores_higher(model, request):
    det = request.getfixturevalue(model)
    good, bad = det.predict(_images(6, seed=2)), det.predict(_images(6, seed=3, defect=True))
    assert good.anomaly_map.shape == (6, SIZE, SIZE) and good.score.shape == (6,)
    assert torch.isfinite(good.anomaly_map).all() and (good.anomaly_map >= 0).all()
    assert bad.score.min() > good.score.max()
    if model == "padim":
        assert torch.equal(good.score, good.anomaly_map.flatten(1).max(1).values)


@pytest.mark.parametrize("model", ["padim", "patchcore"])
def test_same_seed_same_detector(model, request):
    det, again = request.getfixturevalue(model), _fitted(model)
    images = _images(3, seed=4, defect=True)
    assert torch.equal(det.predict(images).anomaly_map, again.predict(images).anomaly_map)
    other = _fitted(model, seed=5)
    state, other_state = det.state_dict(), other.state_dict()
    key = "channels" if model == "padim" else "memory"
    assert not torch.equal(state[key], other_state[key])  # the seed draws the channels / the projection and start


def test_padim_gaussians_equal_torch_cov():
    cfg = resolve_config("padim", "tf_efficientnet_lite0", {"n_features": 10, "batch_size": 5})
    ext = create_extractor("tf_efficientnet_lite0", cfg.layers)
    torch.manual_seed(0)
    det = create_model("padim", ext, SIZE, cfg)
    feats = ext(_images(12, seed=1))
    det.fit(FeatureStore(feats))
    x = embed(feats)[:, det.channels].flatten(2)  # [N, D, P]
    assert torch.equal(embed(feats, det.channels).flatten(2), x)  # picking before upsampling: the same values
    for pos in (0, 37, x.shape[-1] - 1):
        cov = torch.cov(x[:, :, pos].T) + 0.01 * torch.eye(10)
        torch.testing.assert_close(det.mean[:, pos], x[:, :, pos].mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(det.precision[pos], torch.linalg.inv(cov), rtol=1e-3, atol=1e-3)
    test = ext(_images(2, seed=3, defect=True))
    delta = embed(test)[:, det.channels].flatten(2) - det.mean  # [B, D, P]: the distance as the paper writes it
    ref = torch.einsum("bdp,pde,bep->bp", delta, det.precision, delta).sqrt().view(2, *test[0].shape[-2:])
    for chunk in (7, 256):  # chunks that do and do not divide the positions give the same distances
        torch.testing.assert_close(det.distances(test, chunk=chunk), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="only 176 channels"):
        create_model("padim", ext, SIZE, resolve_config("padim", "tf_efficientnet_lite0", {"n_features": 500}))


def _brute_force_greedy(x: torch.Tensor, k: int, start: int) -> list[int]:
    """Greedy k-center as the paper's algorithm 1 states it: all distances recomputed for every pick."""
    picks, dist = [start], (x - x[start]).square().sum(1)
    while len(picks) < k:
        picks.append(int(dist.argmax()))
        dist = torch.minimum(dist, (x - x[picks[-1]]).square().sum(1))
    return picks


def _coreset_case(case: str, g: torch.Generator) -> tuple[torch.Tensor, int, int]:
    """(x, k, start) for one exact-coreset case, small enough for the brute force."""
    if case == "ties":  # many equal distances: the lowest index wins
        return torch.randint(0, 4, (800, 40), generator=g).float(), 120, 3
    if case == "duplicates":  # every row twice; k = N runs on into all-zero distances, where row 0 wins
        base = torch.randint(0, 3, (150, 6), generator=g).float()
        return base[torch.randperm(300, generator=g) % 150], 300, 0
    if case == "clusters":  # 40 tight clusters: the bounds rule out most rows for most picks
        centres = 10 * torch.randn(40, 32, generator=g)
        x = centres[torch.randint(0, 40, (5000,), generator=g)] + 0.05 * torch.randn(5000, 32, generator=g)
        return principal_axes(x), 1500, 11
    n, d, k = {"8 dims": (3000, 8, 300), "128 dims": (2000, 128, 400), "k = N": (500, 3, 500),
               "k = 1": (2500, 64, 1), "40 dims": (4000, 40, 900)}[case]
    return principal_axes(torch.randn(n, d, generator=g) * torch.linspace(3, 0.1, d)), k, 7


@pytest.mark.parametrize("case", ["8 dims", "128 dims", "40 dims", "k = N", "k = 1", "ties", "duplicates",
                                  "clusters"])
def test_coreset_equals_brute_force_greedy(case):
    x, k, start = _coreset_case(case, torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    assert greedy_coreset(x, k, start=start).tolist() == _brute_force_greedy(x, k, start)
    assert torch.get_num_threads() == threads  # the selection runs on one thread, then restores the setting


def test_nearest_equals_cdist():
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(300, 16, generator=g), torch.randn(2000, 16, generator=g)
    dist, idx = nearest(q, bank, k=3, chunk=64)
    ref = torch.cdist(q, bank).topk(3, dim=1, largest=False)
    torch.testing.assert_close(dist, ref.values, rtol=1e-4, atol=1e-4)
    assert (idx == ref.indices).float().mean() > 0.99
    for chunk, tile in ((64, 128), (512, 1024)):  # tiles that do and do not divide the bank
        torch.testing.assert_close(nearest_distances(q, bank, chunk, tile), ref.values[:, 0], rtol=1e-4, atol=1e-4)


def test_patchcore_memory_and_reweighted_score(patchcore):
    n_patches = 12 * (SIZE // 8) ** 2
    assert patchcore.memory.shape == (int(n_patches * 0.1), 40 + 112)
    feats = patchcore.extractor(_images(2, seed=3, defect=True))
    dist, score = patchcore.patch_scores(feats)
    emb, memory = patchcore.embed(feats), patchcore.memory
    for i in range(2):  # eq. 7 as anomalib writes it, from cdist
        d = torch.cdist(emb[i], memory)
        top = int(d.min(1).values.argmax())
        anchor = memory[d[top].argmin()]
        support = torch.cdist(anchor[None], memory)[0].topk(9, largest=False).indices
        weight = 1 - torch.softmax(torch.cdist(emb[i, top][None], memory[support])[0], 0)[0]
        torch.testing.assert_close(score[i], weight * d[top].min(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(dist[i].flatten(), d.min(1).values, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("model", ["padim", "patchcore"])
def test_cli_run_and_listing_mark_the_reference(model, tmp_path):
    from typer.testing import CliRunner

    from adbench.cli import app

    runner = CliRunner()
    listing = runner.invoke(app, ["list", "models"])
    assert f"{model}  (reference baseline, not a flow)" in listing.output
    assert "fastflow\n" in listing.output
    out = runner.invoke(app, ["run", "--model", model, "--dataset", "synthetic", "--category", "pattern",
                              "--image-size", "64", "--results-dir", str(tmp_path), "--no-save-maps"])
    assert out.exit_code == 0, out.output
    (path,) = (tmp_path / "runs").glob(f"{model}_tf_efficientnet_lite0_synthetic_pattern_s0/result.json")
    result = json.loads(path.read_text())
    assert "not a flow" in result["protocol"]["reference_baseline"]
    assert result["metrics"]["image_auroc"] > 0.6 and result["loss_history"] == {}
