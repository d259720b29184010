"""FrEIA flows of ``AllInOneBlock``s over [B, C, H, W] maps computed by hand at inference, one implementation for
FastFlow's and AE-FLOW's flows (``models.fastflow``, ``models.aeflow``): ``flow_z`` gives z, ``mean_sq_z`` the mean
over channels of z^2 (all FastFlow's anomaly map reads). CFLOW-AD's conditional fibre flows have their own
(``models._fibers``), which shares ``hard_permutations``."""

from __future__ import annotations

import math

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
import torch.nn.functional as F
from torch import nn


def hard_permutations(flow: Ff.SequenceINN) -> list[torch.Tensor]:
    """Each block's permutation as FrEIA applies it (``x @ w_perm.T``): the index when it is a hard (one-hot)
    permutation, a gather instead of a C x C product, else w_perm.T. FrEIA never trains w_perm."""
    perms = []
    for block in flow.module_list:
        perm = block.w_perm.detach().flatten(1)
        index = perm.argmax(dim=1)
        hard = bool(torch.equal(perm, torch.eye(len(perm), dtype=perm.dtype, device=perm.device)[index]))
        perms.append(index if hard else perm.T)
    return perms


def fusable(flow: Ff.SequenceINN) -> bool:
    """Whether ``flow_z`` and ``mean_sq_z`` compute this flow: unconditional AllInOneBlocks without GIN, Householder
    reflections or a permutation before the coupling (the blocks FastFlow and AE-FLOW build)."""
    return all(not (block.conditional or block.GIN or block.householder or block.reverse_pre_permute)
               for block in flow.module_list)


def global_affine(block: Fm.AllInOneBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """An AllInOneBlock's global affine: (scale, offset), each [C]."""
    return block.global_scale_activation(block.global_scale).flatten(), block.global_offset.flatten()


def permute_affine(y: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, perm: torch.Tensor,
                   k: int) -> torch.Tensor:
    """(y * scale + offset)[:, perm] for fibres y [N, C], viewed as [N / k, k * C] for the per-channel vectors.

    Where C fills whole 16-lane vectors (k = 1: AE-FLOW's 112 channels, a WRN-50's 256-1024): one affine pass and a
    gather. Where it does not (FastFlow's 24 and 40 channels on Lite0), passes over [N, C] are slow, and one product
    with the [C, C] matrix diag(scale) P is faster (2C FLOPs per element, cheap at such C; one nonzero per column, so in
    fp32 no rounding beyond the affine's, while TF32, which adbench leaves off, would round y), then one offset pass."""
    if k == 1:
        return torch.addcmul(offset, y, scale).gather(1, perm.expand(len(y), -1))
    y = y @ (scale[:, None] * torch.eye(len(perm), dtype=y.dtype, device=y.device)[:, perm])
    y.view(-1, k * len(perm)).add_(offset[perm].repeat(k))
    return y


def scaled_subnet(subnet: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """FrEIA's ``a = 0.1 * subnet(x)`` at inference: the 0.1 folded into the weights of a last convolution (FastFlow's
    subnets and AE-FLOW's "conv": conv-ReLU-conv), else one pass over the output (AE-FLOW's "resnet")."""
    last = subnet[-1] if isinstance(subnet, nn.Sequential) else None
    if not (isinstance(last, nn.Conv2d) and last.bias is not None and last.padding_mode == "zeros"):
        return subnet(x).mul_(0.1)
    inputs = x
    for layer in subnet[:-1]:
        x = x.relu_() if isinstance(layer, nn.ReLU) and x is not inputs else layer(x)  # in place on its own output
    return F.conv2d(x, last.weight * 0.1, last.bias * 0.1, last.stride, last.padding, last.dilation, last.groups)


def _z_fibres(flow: Ff.SequenceINN, x: torch.Tensor, perms: list[torch.Tensor]) -> torch.Tensor:
    """z's fibres [B * H * W, C] in the channel order before the last block's permutation.

    FrEIA's operations per block (subnet on x1, a *= 0.1, x2 * exp(clamp * tanh(a_s)) + a_t, global affine, hard
    permutation), arranged for the CPU on the channels-last fibres, one [B * H * W, C] matrix y = [x1 | x2] per block
    (the subnets' convolutions run 1.4-3x faster channels-last for these few channels): the 0.1 folded into the
    subnet (``scaled_subnet``); x2's update written into y; the global affine and the permutation as one matrix
    (``permute_affine``), not two affine passes over strided halves and two gathers; per-channel vectors applied on a
    [B * H * W / k, k * C] view, which fills the CPU's 16 lanes where C does not."""
    b, c, h, w = x.shape
    blocks = list(flow.module_list)
    c1 = blocks[0].splits[0]  # the subnet's half (FrEIA: the larger), the same in every block of one flow
    k = math.lcm(c, 16) // c  # k * C: whole 16-lane vectors
    k = k if (b * h * w) % k == 0 else 1
    y = x.new_empty(b * h * w, c)
    y.view(b, h, w, c).copy_(x.permute(0, 2, 3, 1))  # always a copy: the blocks write into y, never into x
    for i, block in enumerate(blocks):
        if i:  # the previous block's global affine and permutation
            y = permute_affine(y, *global_affine(blocks[i - 1]), perms[i - 1], k)
        a = scaled_subnet(block.subnet, y[:, :c1].contiguous().view(b, h, w, c1).permute(0, 3, 1, 2))
        a_s, a_t = a.permute(0, 2, 3, 1).reshape(len(y), -1).split(c - c1, dim=1)  # a view when channels-last
        torch.addcmul(a_t, y[:, c1:], a_s.contiguous().tanh_().mul_(block.clamp).exp_(), out=y[:, c1:])
    scale, offset = global_affine(blocks[-1])
    return torch.addcmul(offset.repeat(k), y.view(-1, k * c), scale.repeat(k)).view(-1, c)


def _hard(flow: Ff.SequenceINN) -> list[torch.Tensor] | None:
    """The flow's hard permutations (indices), or None where ``_z_fibres`` does not apply (no blocks, or a soft one)."""
    perms = hard_permutations(flow)
    return perms if perms and all(perm.dtype == torch.long for perm in perms) else None


def flow_z(flow: Ff.SequenceINN, x: torch.Tensor) -> torch.Tensor:
    """FrEIA's ``flow(x)[0]`` (without log|det J|) for ``fusable`` flows: x [B, C, H, W] -> z [B, C, H, W], laid out
    channels-last (``_z_fibres``, then the last permutation as a gather). Soft permutations: FrEIA's forward.
    ``tests/test_fastflow.py`` and ``tests/test_aeflow.py`` check it against FrEIA."""
    perms = _hard(flow)
    if perms is None:
        return flow(x)[0]
    b, c, h, w = x.shape
    z = _z_fibres(flow, x, perms)
    return z.gather(1, perms[-1].expand(len(z), -1)).view(b, h, w, c).permute(0, 3, 1, 2)


def mean_sq_z(flow: Ff.SequenceINN, x: torch.Tensor) -> torch.Tensor:
    """The mean over channels of z^2 [B, H, W], z = FrEIA's ``flow(x)[0]``, for ``fusable`` flows: ``_z_fibres``
    without the last permutation (a mean over channels does not depend on their order). Soft permutations: FrEIA's
    forward. ``tests/test_fastflow.py`` checks it against FrEIA."""
    perms = _hard(flow)
    if perms is None:
        return flow(x)[0].square().mean(1)
    b, _, h, w = x.shape
    return _z_fibres(flow, x, perms).square_().mean(1).view(b, h, w)
