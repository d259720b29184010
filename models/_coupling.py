"""The z of a FrEIA flow of ``AllInOneBlock``s over [B, C, H, W] maps, computed by hand at inference: FastFlow's and
AE-FLOW's flows (``models.fastflow``, ``models.aeflow``); CFLOW-AD's conditional fibre flows have their own
(``models.cflow``), which share ``hard_permutations``."""

from __future__ import annotations

import FrEIA.framework as Ff
import torch


def hard_permutations(flow: Ff.SequenceINN) -> list[torch.Tensor]:
    """Each block's permutation as FrEIA applies it (``x @ w_perm.T``): the index when it is a hard (one-hot)
    permutation, a gather instead of a C x C product, else w_perm.T. FrEIA never trains w_perm: compute once."""
    perms = []
    for block in flow.module_list:
        perm = block.w_perm.detach().flatten(1)
        index = perm.argmax(dim=1)
        hard = bool(torch.equal(perm, torch.eye(len(perm), dtype=perm.dtype, device=perm.device)[index]))
        perms.append(index if hard else perm.T)
    return perms


def fusable(flow: Ff.SequenceINN) -> bool:
    """Whether ``flow_z`` computes this flow: unconditional AllInOneBlocks without GIN, Householder reflections or a
    permutation before the coupling (the blocks FastFlow and AE-FLOW build)."""
    return all(not (block.conditional or block.GIN or block.householder or block.reverse_pre_permute)
               for block in flow.module_list)


def flow_z(flow: Ff.SequenceINN, x: torch.Tensor) -> torch.Tensor:
    """FrEIA's ``flow(x)[0]`` (without log|det J|) for ``fusable`` flows, maps x [B, C, H, W] -> z [B, C, H, W].

    The same operations per block (subnet on x1, a *= 0.1, s = clamp * tanh(a_s), x2 * exp(s) + a_t, global affine,
    permutation), arranged for the CPU: the maps channels-last, i.e. [B * H * W, C] matrices of fibres, on which the
    subnets' convolutions run 1.4-3x faster than planar for these few channels; each half of ``a`` scaled into a
    contiguous copy (tanh on a strided view is several times slower); the global affine written straight into the
    halves of one matrix (no concatenation); and the hard permutation a gather of the next block's two halves, each
    contiguous (the subnet's input needs no copy), instead of a 1 x 1 convolution with a one-hot matrix. Soft
    permutations: FrEIA's forward. ``tests/test_fastflow.py`` and ``tests/test_aeflow.py`` check it against FrEIA.
    """
    b, c, h, w = x.shape
    blocks, perms = list(flow.module_list), hard_permutations(flow)
    if any(perm.dtype != torch.long for perm in perms):
        return flow(x)[0]
    c1 = blocks[0].splits[0]  # the subnet's half (FrEIA: the larger), the same in every block of one flow
    fibres = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view when x is channels-last
    x1, x2, y = fibres[:, :c1].contiguous(), fibres[:, c1:], fibres
    for i, block in enumerate(blocks):
        if i:  # the previous block's permutation: a gather of this block's two halves
            x1, x2 = (y.gather(1, part.expand(len(y), -1)) for part in perms[i - 1].split([c1, c - c1]))
        a = block.subnet(x1.view(b, h, w, c1).permute(0, 3, 1, 2))  # channels-last in, channels-last out
        a_s, a_t = (half.mul(0.1) for half in a.permute(0, 2, 3, 1).reshape(len(x1), -1).split(c - c1, dim=1))
        scale = block.global_scale_activation(block.global_scale).view(c)
        offset, y = block.global_offset.view(c), x1.new_empty(len(x1), c)
        torch.addcmul(offset[:c1], x1, scale[:c1], out=y[:, :c1])
        torch.addcmul(offset[c1:], torch.addcmul(a_t, x2, a_s.tanh_().mul_(block.clamp).exp_()), scale[c1:],
                      out=y[:, c1:])
    return y.gather(1, perms[-1].expand(len(y), -1)).view(b, h, w, c).permute(0, 3, 1, 2)
