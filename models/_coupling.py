"""The z of a FrEIA flow of ``AllInOneBlock``s over [B, C, H, W] maps, computed by hand at inference: FastFlow's and
AE-FLOW's flows (``models.fastflow``, ``models.aeflow``); CFLOW-AD's conditional fibre flows have their own
(``models.cflow``)."""

from __future__ import annotations

import FrEIA.framework as Ff
import torch

from adbench.models.cflow import hard_permutations


def fusable(flow: Ff.SequenceINN) -> bool:
    """Whether ``flow_z`` computes this flow: unconditional AllInOneBlocks without GIN, Householder reflections or a
    permutation before the coupling (the blocks FastFlow and AE-FLOW build)."""
    return all(not (block.conditional or block.GIN or block.householder or block.reverse_pre_permute)
               for block in flow.module_list)


def flow_z(flow: Ff.SequenceINN, x: torch.Tensor) -> torch.Tensor:
    """FrEIA's ``flow(x)[0]`` (without log|det J|) for ``fusable`` flows, maps x [B, C, H, W] -> z [B, C, H, W].

    The same operations per block (subnet on x1, a *= 0.1, s = clamp * tanh(a_s), x2 * exp(s) + a_t, global affine,
    permutation), arranged for the CPU: the maps channels-last, i.e. a [B * H * W, C] matrix of fibres, on which the
    subnets' convolutions run 1.4-3x faster than planar for these few channels; each half of ``a`` scaled into a
    contiguous copy (tanh on a strided view is several times slower), the global affine written straight into the
    halves of the next fibres (no concatenation), and the hard permutation a gather instead of a 1 x 1 convolution
    with a one-hot matrix. ``tests/test_fastflow.py`` and ``tests/test_aeflow.py`` check it against FrEIA.
    """
    b, c, h, w = x.shape
    fibres = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view when x is channels-last
    for block, perm in zip(flow.module_list, hard_permutations(flow), strict=True):
        x1, x2 = fibres.split(block.splits, dim=1)
        c1 = x1.shape[1]
        a = block.subnet(x1.reshape(b, h, w, c1).permute(0, 3, 1, 2))  # channels-last in, channels-last out
        a_s, a_t = (half.mul(0.1) for half in a.permute(0, 2, 3, 1).reshape(len(fibres), -1).split(c - c1, dim=1))
        scale = block.global_scale_activation(block.global_scale).view(c)
        offset, fibres = block.global_offset.view(c), torch.empty_like(fibres)
        torch.addcmul(offset[:c1], x1, scale[:c1], out=fibres[:, :c1])
        x2 = torch.addcmul(a_t, x2, a_s.tanh_().mul_(block.clamp).exp_())
        torch.addcmul(offset[c1:], x2, scale[c1:], out=fibres[:, c1:])
        fibres = fibres.gather(1, perm.expand(len(fibres), -1)) if perm.dtype == torch.long else fibres @ perm
    return fibres.view(b, h, w, c).permute(0, 3, 1, 2)
