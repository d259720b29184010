"""Feature extractors: the offline ImageNet weights, layer selection, freezing, normalisation, the feature store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib import cbook
from PIL import Image

from adbench.datasets import AnomalyDataset, open_family
from adbench.errors import ConfigError
from adbench.features import create_extractor, extract_features, list_backbones, lite0_offline_weights
from conftest import make_mvtec


def test_offline_lite0_weights_classify_a_photo():
    """Mapped by position, the package's weights must make timm's Lite0 an ImageNet classifier again."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(lite0_offline_weights(model))
    img = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB").resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()[None] / 255
    with torch.no_grad():
        top = model((x - 0.5) / 0.5).softmax(-1).topk(3).indices[0].tolist()
    assert top[0] == 652  # ImageNet "military uniform": the classic label of this photo of Grace Hopper


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
