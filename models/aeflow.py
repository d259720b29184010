"""AE-FLOW (Zhao, Ding, Zhang, ICLR 2023): an autoencoder with a normalizing flow in its bottleneck.

There is no official code; the paper's sentences are quoted in the reproductions pimpraat/ae_flow, Urukat/AE-Flow and
asiraudin/ae-flow, which disagree where the paper is silent. Every such choice is a config field below.

- encoder: a frozen ImageNet CNN truncated at stride 16 (256 px -> 16x16; WideResNet-50 stem + layer1..3 = 1024 ch,
  paper §3.1); features come from the shared cache, so training touches only the flow and the decoder; adbench
  standardises each channel with training-set statistics before the flow (``standardize``; a constant Jacobian);
- flow: FrEIA ``AllInOneBlock``s on the [C, 16, 16] map (FastFlow-style 2D flow), subnet "conv" (3x3 conv, ReLU,
  1x1 conv) or "resnet" (3x3 conv + BatchNorm + ReLU, plus a 1x1-conv shortcut), the paper's two types;
- decoder from the flow output z': per block a 2x2 stride-2 transposed conv, widths "symmetric with the encoder"
  (WRN-50: 1024 -> 512 -> 256 -> 64 -> 3; Lite0: 112 -> 40 -> 24 -> 16 -> 3), an extra 3x3 conv in the first three,
  Tanh at the end: it reconstructs the image mapped to [-1, 1] (2x - 1; Lite0's own input normalisation);
- loss: alpha * NLL(z) / D + (1 - alpha) * MSE(2x - 1, x'), alpha = 0.5 (the per-dimension NLL keeps the flow term
  on the scale of the MSE; the raw NLL, ~10^5 nats, swamps it and can be negative, pimpraat blog);
- image score: beta * z(S_flow) + (1 - beta) * z(S_recon), beta = 0.9, with S_flow = -log N(z'; 0, I) / D (the
  likelihood of z' under the base density, per dimension), S_recon = -SSIM(x, x'), and z(.) the standardisation with
  the TRAINING set's mean and std, so beta weighs two unit-free terms;
- anomaly map (the paper has none): the same beta-weighted sum of the standardised per-position flow NLL (bilinear
  to the input) and the standardised local dissimilarity 1 - SSIM(x, x') (channel mean), training-set statistics.

SSIM (image value and per-pixel map): torchmetrics' (window 11, sigma 1.5, data range 1), faster (``models/_ssim.py``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
import torch.nn.functional as F
from torch import nn

from adbench.errors import ConfigError, TrainingError
from adbench.features import FeatureExtractor, FeatureStore
from adbench.models._batchnorm import population_batchnorm
from adbench.models._coupling import flow_z, fusable
from adbench.models._registry import Detector, Prediction, register_model
from adbench.models._ssim import ssim_map
from adbench.progress import NULL_PROGRESS, Progress
from adbench.train import Stage, run_stage

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_STATS = ("flow_score", "recon_score", "flow_map", "recon_map")  # rows of the ``norm`` buffer: (mean, std)


@dataclass(frozen=True)
class AEFlowConfig:
    """AE-FLOW hyperparameters: the paper where it speaks (via the reproductions' quotes), else marked adbench."""

    layers: tuple[int, ...] = (3,)  # one stride-16 stage (paper: WRN-50 to layer3, 1024x16x16; Lite0: 112x16x16)
    finetune_encoder: bool = False  # paper unclear: Urukat freezes the encoder, pimpraat trains it; adbench: frozen
    # (cached features, CPU-friendly); True trains a copy of the backbone's weights with the same optimiser (its
    # BatchNorm statistics stay ImageNet's)
    standardize: bool = True  # adbench: per-channel training-set mean/std of the encoder map before the flow. The
    # paper has none: WRN-50's layer3 follows a ReLU and is O(1); Lite0's stride-16 block output is linear, channel
    # means up to +-14, which the flow's global offset needs thousands of Adam steps to absorb (measured without it:
    # epoch-1 mean loss 1.8e5 and Img AUROC 70.2 vs 82.2 on synthetic "pattern", README)
    subnet: str = "resnet"  # paper §3.2: "resnet" for all datasets but chest X-ray ("conv"); pimpraat found conv
    # better on BTAD (0.79 vs 0.53 AUROC)
    hidden_channels: int = 256  # "conv" subnet width: the paper gives none; pimpraat 256 ("resnet" has no hidden layer)
    flow_steps: int = 8  # AllInOneBlocks: unstated in the paper; 8 in all three reproductions
    clamp: float = 2.0  # affine clamp: FrEIA's default, used by all reproductions
    decoder_channels: tuple[int, ...] = (512, 256, 64)  # paper: "symmetric with the encoder (1024 -> 512 -> 256 ->
    # 64)" = WRN-50's stage widths at strides 8, 4, 2, then to 3 (pimpraat); other backbones: their own stage widths
    # (BACKBONE_DEFAULTS), e.g. Lite0 40-24-16 (the WRN widths cost ~13 GFLOP per 256 px image, 70x more)
    alpha: float = 0.5  # loss weight of the flow term (paper: alpha = 0.5)
    beta: float = 0.9  # score weight of the flow term (paper: beta = 0.9, all reproductions)
    flow_score: str = "nll"  # S_flow: "nll" = -log N(z') / D (pimpraat, Urukat's default); "likelihood" =
    # -exp(log N(z') / D), the paper's -p(z') read literally: same flow-only ranking, but bounded, so it compresses
    # strong anomalies once standardised and mixed with S_recon
    lr: float = 2e-3  # pimpraat train.py (paper §3.2 as they read it; chest X-ray 1e-3); on MTD the loss spiked
    # once in epoch 3 at this rate (README)
    weight_decay: float = 1e-4  # pimpraat: "10e-5" (= 1e-4; chest X-ray 0)
    grad_clip: float = 1.0  # adbench stabiliser (0 = off, the paper's plain Adam): on MTD one training image drew
    # NLLs of 90, 1.5e3, 5.7e5 per dim with gradient norms 4e3-1e6 (others 0.1-0.5), each step throwing the flow off
    # (epoch losses 0.97, 1.69, 374, 0.90, 0.78); a norm of 1, twice the largest healthy one, caps only those
    # (0.84, 0.60, 0.57, 0.53, 0.51; lr 1e-3 or fp16 features did not prevent it; results/aeflow_mtd.md)
    bn_stats: str = "population"  # resnet subnet's BatchNorm at inference: Ioffe & Szegedy 2015 (Alg. 2), batch mean
    # and unbiased variance averaged over all training batches after training; "running" = torch's moving average
    # (momentum 0.1), mostly the last ~20 batches of the seed's shuffle: the scored density varies with their order
    average_last: float = 0.25  # adbench: the weights of every step in this final fraction of the epochs averaged
    # (Polyak-Ruppert tail averaging, SWA's per-step form, Izmailov et al. 2018: 0.25 of the budget), then BatchNorm
    # statistics for them (bn_stats population, as SWA); 0 = the last step's weights (the paper). Chosen over 0 on
    # MTD's validation split (rule fixed before running: seeds rank it more alike, 0.983 vs 0.960 Spearman, mean
    # validation Img AUROC at most 0.5 lower: 98.7 vs 98.5; grids/mtd_validation_aeflow_average.toml)
    batch_size: int = 16  # Urukat / asiraudin 16; pimpraat 64 (preset "paper"): 16 gives more steps per CPU epoch
    epochs: int = 15  # adbench CPU default: 720 steps on MTD's 761 images (about 2 min on 2 idle cores); the
    # reproductions train 100 (preset "paper"). Chosen over 5 on MTD's validation split (rule fixed before running:
    # a lower seed std of validation Img AUROC, its mean at most 0.5 lower; 0.07 against 0.47, mean 98.3 against
    # 98.0; grids/mtd_validation_aeflow.toml)

    VALUE_BEFORE: ClassVar[dict] = {"bn_stats": "running", "average_last": 0.0}  # runs made before the field

    def __post_init__(self) -> None:  # checked when the config is resolved, before any work
        if self.subnet not in ("conv", "resnet"):
            raise ConfigError(f"aeflow subnet must be conv or resnet, got {self.subnet!r}")
        if self.bn_stats not in ("population", "running"):
            raise ConfigError(f"aeflow bn_stats must be population or running, got {self.bn_stats!r}")
        if self.flow_score not in ("nll", "likelihood"):
            raise ConfigError(f"aeflow flow_score must be nll or likelihood, got {self.flow_score!r}")
        if len(self.layers) != 1:
            raise ConfigError(f"aeflow encodes with ONE feature stage (stride 16), got layers={list(self.layers)}")
        for name, value in (("alpha", self.alpha), ("beta", self.beta)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"aeflow: {name}={value} is invalid; it must be in [0, 1]")
        if not 0.0 <= self.average_last < 1.0 or (self.average_last and self.bn_stats != "population"):
            raise ConfigError(f"aeflow: average_last={self.average_last} must be in [0, 1) and needs bn_stats="
                              "population (averaged weights need their BatchNorm statistics); with running, set it 0")
        if self.grad_clip < 0:
            raise ConfigError(f"aeflow: grad_clip={self.grad_clip} is invalid; it must be >= 0 (0 = no clipping)")
        if self.hidden_channels < 1 or not self.decoder_channels or min(self.decoder_channels) < 1:
            raise ConfigError("aeflow: hidden_channels and every decoder_channels entry must be >= 1")


class ResNetSubnet(nn.Module):
    """Paper's "ResNet-type" subnet: ReLU(BN(conv3x3(x))) + conv1x1(x) (pimpraat ``Conv3x3_res_1x1``)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x))) + self.shortcut(x)


def subnet_factory(kind: str, hidden: int):
    """FrEIA subnet constructor ``f(c_in, c_out)``: "conv" = conv3x3(hidden)-ReLU-conv1x1, or "resnet"."""
    if kind == "resnet":
        return ResNetSubnet

    def conv(c_in: int, c_out: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, c_out, 1))

    return conv


def build_flow(shape: tuple[int, int, int], cfg: AEFlowConfig) -> Ff.SequenceINN:
    """A 2D flow over the [C, H, W] latent map: ``cfg.flow_steps`` AllInOneBlocks with hard permutations."""
    flow = Ff.SequenceINN(*shape)
    for _ in range(cfg.flow_steps):
        flow.append(Fm.AllInOneBlock, subnet_constructor=subnet_factory(cfg.subnet, cfg.hidden_channels),
                    affine_clamping=cfg.clamp, permute_soft=False)  # hard: FrEIA's default, all reproductions
    return flow


def build_decoder(c_in: int, channels: tuple[int, ...], c_out: int = 3) -> nn.Sequential:
    """Per width: ConvT 2x2/2 + ReLU + conv3x3 + ReLU; then ConvT 2x2/2 to ``c_out`` + Tanh (upsamples 2^(n+1)).

    The paper names the layers, not the activations; ReLU and the Tanh output follow pimpraat/ae_flow."""
    layers: list[nn.Module] = []
    for width in channels:
        layers += [nn.ConvTranspose2d(c_in, width, 2, stride=2), nn.ReLU(),
                   nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        c_in = width
    return nn.Sequential(*layers, nn.ConvTranspose2d(c_in, c_out, 2, stride=2), nn.Tanh())


def flow_nll_per_dim(z: torch.Tensor, log_jac: torch.Tensor) -> torch.Tensor:
    """-log p(x) / D of each sample [B]: (0.5 |z|^2 + D ln sqrt(2 pi) - log|det J|) / D."""
    d = z[0].numel()
    return (0.5 * z.flatten(1).pow(2).sum(dim=1) - log_jac) / d + _HALF_LOG_2PI


def loss(z: torch.Tensor, log_jac: torch.Tensor, recon: torch.Tensor, target: torch.Tensor,
         alpha: float) -> torch.Tensor:
    """alpha * mean per-dimension NLL + (1 - alpha) * MSE(target, recon).

    Targets and recon are in [-1, 1] (the Tanh output's range, as pimpraat/ae_flow), so the MSE is 4x the one on
    [0, 1] images: alpha = 0.5 is read on that scale (the paper states neither)."""
    return alpha * flow_nll_per_dim(z, log_jac).mean() + (1 - alpha) * F.mse_loss(recon, target)


def flow_scores(z: torch.Tensor, size: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """S_flow [B] and its map [B, size, size] from z' [B, C, h, w]: -log N(z'; 0, I) per dimension (or -exp(-.))."""
    per_pos = 0.5 * z.pow(2).mean(dim=1) + _HALF_LOG_2PI  # [B, h, w]
    image = per_pos.flatten(1).mean(dim=1)
    if kind == "likelihood":
        per_pos, image = -torch.exp(-per_pos), -torch.exp(-image)
    amap = F.interpolate(per_pos.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return image, amap


def recon_scores(x: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """S_recon = -SSIM(x, x') [B] and the map 1 - local SSIM (channel mean) [B, H, W]; images in [0, 1]."""
    full = ssim_map(recon, x)
    return -full.flatten(1).mean(1), 1.0 - full.mean(dim=1)


def as_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float images -> float in [0, 1]."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


@register_model("aeflow")
class AEFlow(Detector):
    """AE-FLOW: frozen encoder -> 2D flow -> decoder; flow likelihood and SSIM, standardised on the training set."""

    Config = AEFlowConfig
    PRESETS = {"paper": {"epochs": 100, "batch_size": 64}}  # pimpraat: 100 epochs, batch 64
    BACKBONE_DEFAULTS = {  # decoder "symmetric with the encoder": timm feature_info channels at strides 8, 4, 2
        "tf_efficientnet_lite0": {"decoder_channels": (40, 24, 16)},
        "tf_efficientnet_lite1": {"decoder_channels": (40, 24, 16)},  # Lite1 only deepens Lite0
        "tf_efficientnet_lite2": {"decoder_channels": (48, 24, 16)},  # x1.1 widths, rounded to 8
        "mobilenetv3_large_100": {"decoder_channels": (40, 24, 16)},
        "efficientnet_b5": {"decoder_channels": (64, 40, 24)},
        "resnet18": {"decoder_channels": (128, 64, 64)},
    }  # resnet50 and wide_resnet50_2: the default, the paper's 512-256-64
    needs_images = True  # the reconstruction target

    def __init__(self, extractor: FeatureExtractor, image_size: int, config: AEFlowConfig) -> None:
        super().__init__(extractor, image_size, config)
        (shape,) = extractor.feature_shapes(image_size)
        c, h, w = shape
        up = 2 ** (len(config.decoder_channels) + 1)
        if (h * up, w * up) != (image_size, image_size):
            raise ConfigError(
                f"aeflow: the decoder upsamples x{up} ({len(config.decoder_channels) + 1} blocks), but layer "
                f"{config.layers[0]} of {extractor.backbone} gives {h}x{w} for {image_size} px images; use a "
                f"stride-{up} layer (default layers=3) and an image size divisible by {up}"
            )
        self.encoder = copy.deepcopy(extractor.net).requires_grad_(True) if config.finetune_encoder else None
        self.flow = build_flow(shape, config)
        self.fused = fusable(self.flow)  # scoring's z' by ``flow_z`` (False: FrEIA's forward; the same z')
        # channels-last: the same convolutions, 1.4-1.7x faster on the CPU for its few-channel, large maps
        self.decoder = build_decoder(c, config.decoder_channels).to(memory_format=torch.channels_last)
        self.register_buffer("norm", torch.tensor([[0.0, 1.0]] * len(_STATS)))  # (mean, std) per _STATS row
        self.register_buffer("feat_mean", torch.zeros(c, 1, 1))  # encoder-map standardisation (``standardize``)
        self.register_buffer("feat_std", torch.ones(c, 1, 1))
        self._train_images: torch.Tensor | None = None  # kept by ``fit`` for ``calibrate``

    def train(self, mode: bool = True) -> AEFlow:
        """A fine-tuned encoder keeps its BatchNorm in eval mode (running statistics from ImageNet)."""
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()
        return self

    def encode(self, images: torch.Tensor, cached: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder map [B, C, h, w]: the frozen extractor's (or ``cached``), or the fine-tuned copy's."""
        if self.encoder is None:
            return cached if cached is not None else self.extractor(images)[0]
        return self.encoder((as_unit(images) - self.extractor.mean) / self.extractor.std)[0]

    def forward(self, features: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, ...]:
        """Encoder map [B, C, h, w] -> (z' [B, C, h, w], log|det J| [B], reconstruction in [-1, 1] [B, 3, S, S]);
        ``fused``: z' by ``flow_z`` (inference: the same z', faster; no log|det J|, None)."""
        x = (features - self.feat_mean) / self.feat_std
        z, log_jac = (flow_z(self.flow, x), None) if fused else self.flow(x)
        return z, log_jac, self.decoder(z.contiguous(memory_format=torch.channels_last)).contiguous()

    def raw_scores(self, features: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unstandardised S_flow, S_recon [B] and their maps [B, S, S] (keys as ``_STATS``)."""
        z, _, recon = self(features, fused=self.fused)
        s_flow, m_flow = flow_scores(z, self.image_size, self.config.flow_score)
        s_recon, m_recon = recon_scores(as_unit(images), (recon + 1) / 2)
        return {"flow_score": s_flow, "recon_score": s_recon, "flow_map": m_flow, "recon_map": m_recon}

    def training_batch(self, features: FeatureStore, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training images ``idx`` on the device and their encoder map (the cached rows unless it is fine-tuned)."""
        batch = self._train_images[idx].to(self.device, non_blocking=True)
        cached = features.tensors[0][idx].to(self.device, non_blocking=True) if self.encoder is None else None
        return batch, self.encode(batch, cached)

    def fit(self, features: FeatureStore, progress: Progress = NULL_PROGRESS,
            images: torch.Tensor | None = None) -> dict[str, list[float]]:
        cfg = self.config
        if images is None or len(images) != len(features):
            raise TrainingError("aeflow needs the training images, one per feature row (fit(..., images=...))")
        self._train_images = images
        if cfg.standardize:  # per-channel statistics of the (initial) encoder map over the training set
            n, s1, s2 = 0, 0.0, 0.0
            for idx in features.index_batches(cfg.batch_size):
                f = features.tensors[0][idx].double()
                n, s1, s2 = n + f.numel() // f.shape[1], s1 + f.sum(dim=(0, 2, 3)), s2 + f.pow(2).sum(dim=(0, 2, 3))
            self.feat_mean.copy_((s1 / n).view(-1, 1, 1))
            self.feat_std.copy_((s2 / n - (s1 / n) ** 2).clamp_min(1e-12).sqrt().view(-1, 1, 1))
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))

        def batch_loss(idx: torch.Tensor) -> torch.Tensor:
            batch, encoded = self.training_batch(features, idx)
            z, log_jac, recon = self(encoded)
            return loss(z, log_jac, recon, as_unit(batch) * 2 - 1, cfg.alpha)

        self.train()
        stage = Stage(name="aeflow", params=[p for p in self.parameters() if p.requires_grad], loss=batch_loss,
                      batches=lambda epoch: features.index_batches(cfg.batch_size, gen), epochs=cfg.epochs,
                      lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip or None,
                      average_last=cfg.average_last)
        history = run_stage(stage, progress)
        if cfg.bn_stats == "population":
            population_batchnorm(self.flow, ((self.training_batch(features, idx)[1] - self.feat_mean) / self.feat_std
                                             for idx in features.index_batches(cfg.batch_size)))
        self.calibrate(features)
        return {"aeflow": history}

    @torch.no_grad()
    def calibrate(self, features: FeatureStore) -> None:
        """Mean and std over the training set of S_flow, S_recon (per image) and of both maps (per pixel)."""
        if self._train_images is None:
            raise TrainingError("aeflow.calibrate needs the training images: call fit(features, images=...) first")
        self.eval()
        scores = {k: [] for k in _STATS[:2]}
        sums = {k: torch.zeros(3, dtype=torch.float64) for k in _STATS[2:]}  # count, sum, sum of squares
        for idx in features.index_batches(self.config.batch_size):
            batch, encoded = self.training_batch(features, idx)
            raw = self.raw_scores(encoded, batch)
            for k in scores:
                scores[k].append(raw[k].double().cpu())
            for k, acc in sums.items():
                m = raw[k].double()
                acc += torch.stack([torch.tensor(m.numel(), dtype=torch.float64), m.sum().cpu(), m.pow(2).sum().cpu()])
        rows = [(torch.cat(scores[k]).mean(), torch.cat(scores[k]).std(correction=0)) for k in _STATS[:2]]
        for k in _STATS[2:]:
            n, s1, s2 = sums[k]
            rows.append((s1 / n, (s2 / n - (s1 / n) ** 2).clamp_min(0).sqrt()))
        # a std of at least 1e-6: a constant term (e.g. an untrained decoder) must not divide by zero
        self.norm.copy_(torch.tensor([[float(m), max(float(s), 1e-6)] for m, s in rows]))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        images = images.to(self.device)
        raw = self.raw_scores(self.encode(images), images)
        std = {k: (raw[k] - self.norm[i, 0]) / self.norm[i, 1] for i, k in enumerate(_STATS)}
        beta = self.config.beta
        return Prediction(
            score=beta * std["flow_score"] + (1 - beta) * std["recon_score"],
            anomaly_map=beta * std["flow_map"] + (1 - beta) * std["recon_map"],
            parts={"flow": (std["flow_score"], std["flow_map"]), "recon": (std["recon_score"], std["recon_map"])},
        )

    def protocol(self) -> dict[str, str]:
        (fs, fss), (rs, rss), (fm, fms), (rm, rms) = self.norm.tolist()
        beta, kind = self.config.beta, self.config.flow_score
        flow = "-log N(z'; 0, I) / D" if kind == "nll" else "-exp(log N(z'; 0, I) / D)"
        return {
            "image_score": f"{beta} * (S_flow - {fs:.4g}) / {fss:.4g} + {1 - beta:.4g} * (S_recon - {rs:.4g}) / "
                           f"{rss:.4g}; S_flow = {flow}, S_recon = -SSIM(x, x') (torchmetrics, window 11, sigma "
                           "1.5, images in [0, 1]); mean/std over the training set",
            "anomaly_map": f"{beta} * (flow map - {fm:.4g}) / {fms:.4g} + {1 - beta:.4g} * (recon map - {rm:.4g}) / "
                           f"{rms:.4g}; flow map = per-position {flow} upsampled bilinearly, recon map = 1 - local "
                           "SSIM (channel mean); mean/std over all training pixels",
            "parts": "flow = the standardised flow terms alone (beta = 1), recon = the SSIM terms alone (beta = 0)",
        }
