"""CFLOW-AD's conditional flows on fibers [N, C], by hand: the forward of FrEIA's ``AllInOneBlock``s (subnet
Linear-ReLU-Linear on [x1, cond], a *= 0.1, s = clamp * tanh(a_s), x2 * exp(s) + a_t, global affine, permutation)
with the condition's share of each first layer computed per position, and for training its backward written out.

The condition's share: FrEIA feeds [x1, cond] to each first subnet layer, so every fiber pays for W_c @ cond + b, which
depends only on its position. The encoding's first half depends only on x and its second only on y, so that addend is
a product on the W columns and the H rows of positions, for all blocks at once, gathered per fiber.

The backward (``FiberFlow``): a training step is 256 fibers, so every operation is small and costs its call, not its
arithmetic. Autograd records some 40 nodes per block (the addend's tables, their gathers, the weights' splits and
concatenations included) and replays each with its bookkeeping; written out, a block's backward is about 20 plain
operations, and the forward runs without recording. The arithmetic is the same: ``tests/test_cflow.py`` checks the
loss and every gradient against FrEIA's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import FrEIA.framework as Ff
import torch
from torch import nn


@dataclass
class Fixed:
    """What of a flow the loss does not differentiate: the split, clamps, permutations and the encoding's tables."""

    c1: int  # FrEIA's split: x1 (the subnet's input) gets the larger half
    clamps: list[float]
    perms: list[torch.Tensor]  # ``models._coupling.hard_permutations``: an index, or a matrix (soft)
    pos_x: torch.Tensor  # [W, P / 2]: the encoding's x half along the columns
    pos_y: torch.Tensor  # [H, P / 2]: its y half along the rows


class Part(NamedTuple):
    """One block, as ``block`` computes it (``parts``)."""

    addend: torch.Tensor  # [N or H * W, hidden]: the condition's share of the first layer, plus its bias
    w_x: torch.Tensor  # [c1, hidden]: the first layer's columns for x1, transposed
    w2: torch.Tensor  # [2 * c2, hidden]: the last layer
    b2: torch.Tensor
    scale: torch.Tensor  # [C]: the global affine
    offset: torch.Tensor  # [C]
    log_scale: torch.Tensor  # log|det| of the scale (a scalar)
    clamp: float
    perm: torch.Tensor  # ``hard_permutations``: an index, or a matrix


def flow_tensors(flow: Ff.SequenceINN, pos: torch.Tensor, perms: list[torch.Tensor]) -> tuple[Fixed, list]:
    """The flow's parts for ``parts``/``FiberFlow``, from its current parameters: ``Fixed`` and the differentiable
    tensors [scales [blocks * C], log|det| of each block's scale [blocks], then each block's first-layer weight,
    first-layer bias, last-layer weight, last-layer bias, global offset [C]]. ``pos`` [P, H, W]: the encoding (or
    zeros)."""
    blocks, p = list(flow.module_list), len(pos)
    c = len(perms[0])
    if not all(isinstance(block.subnet[1], nn.ReLU) for block in blocks) or len(
            {block.global_scale_activation.__code__ for block in blocks}) > 1:  # one activation serves all blocks
        raise TypeError("the fused CFLOW path expects build_flow's blocks (subnet_fc, one global affine type)")
    scales = blocks[0].global_scale_activation(torch.cat([block.global_scale.view(c) for block in blocks]))
    fixed = Fixed(c - c // 2, [block.clamp for block in blocks], perms, pos[: p // 2, 0].T.contiguous(),
                  pos[p // 2 :, :, 0].T.contiguous())
    layers = [[block.subnet[0].weight, block.subnet[0].bias, block.subnet[2].weight, block.subnet[2].bias,
               block.global_offset.view(c)] for block in blocks]
    return fixed, [scales, torch.log(scales).view(len(blocks), c).sum(dim=1), *(t for layer in layers for t in layer)]


def parts(fixed: Fixed, ix: torch.Tensor, iy: torch.Tensor, scales: torch.Tensor, log_scales: torch.Tensor,
          *layers: torch.Tensor) -> list[Part]:
    """Each block's part for ``block``, the addend gathered for the positions (``ix``, ``iy``) [N]."""
    w1, b1, w2, b2, offsets = (layers[i::5] for i in range(5))
    p = 2 * fixed.pos_x.shape[1]
    w_cx, w_cy = torch.cat([w[:, fixed.c1 :] for w in w1]).split(p // 2, dim=1)  # [blocks * hidden, P / 2] each
    along_x = torch.addmm(torch.cat(b1), fixed.pos_x, w_cx.T)  # [W, blocks * hidden]
    along_y = torch.mm(fixed.pos_y, w_cy.T)  # [H, blocks * hidden]
    addend = along_x.index_select(0, ix) + along_y.index_select(0, iy)
    return list(map(Part, addend.split(len(b1[0]), dim=1), [w[:, : fixed.c1].T for w in w1], w2, b2,
                    scales.split(len(offsets[0])), offsets, log_scales.unbind(), fixed.clamps, fixed.perms))


def block(x: torch.Tensor, part: Part, saved: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One coupling block: fibers ``x`` [N, C] -> (the next block's input [N, C], log|det J| [N]). ``saved`` collects
    what the backward needs. The addend is per fiber ([N, hidden]) or per position of k whole images."""
    addend, w_x, w2, b2, scale, offset, log_scale, clamp, perm = part
    x1, x2 = x.split([len(w_x), x.shape[1] - len(w_x)], dim=1)
    hidden = (torch.addmm(addend, x1, w_x) if len(addend) == len(x) else  # training: an addend per fiber
              torch.mm(x1, w_x).view(-1, *addend.shape).add_(addend).view(len(x), -1)).relu_()  # k images
    a_s, a_t = torch.addmm(b2, hidden, w2.T, beta=0.1, alpha=0.1).split(x2.shape[1], dim=1)
    t = torch.tanh(a_s.contiguous())  # tanh of a contiguous copy: up to 6x faster than of the strided half
    s = t.mul(clamp)
    e = torch.exp(s)
    u = torch.cat((x1, torch.addcmul(a_t, x2, e)), dim=1)
    x = torch.addcmul(offset, u, scale)
    x = torch.gather(x, 1, perm.expand(len(x), -1)) if perm.dtype == torch.long else x @ perm  # 1.5x index_select
    if saved is not None:
        saved.append((x1, x2, hidden, t, e, u))
    return x, s.sum(dim=1) + log_scale


def forward(x: torch.Tensor, block_parts: list[Part], saved: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All blocks: fibers [N, C] -> (z [N, C], log|det J| [N])."""
    log_jac = 0.0
    for part in block_parts:
        x, block_log_jac = block(x, part, saved)
        log_jac = log_jac + block_log_jac
    return x, log_jac


class FiberFlow(torch.autograd.Function):
    """(z, log|det J|) of fibers x [N, C] at positions (ix, iy) [N]: ``forward`` of ``parts``, differentiable in x and
    in ``flow_tensors``' tensors, its backward written out (once: no double backward).
    ``FiberFlow.apply(x, ix, iy, fixed, *tensors)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ix: torch.Tensor, iy: torch.Tensor, fixed: Fixed, *tensors: torch.Tensor):
        ctx.parts, ctx.saved, ctx.fixed, ctx.ix, ctx.iy = parts(fixed, ix, iy, *tensors), [], fixed, ix, iy
        return forward(x, ctx.parts, ctx.saved)  # kept on ctx, not saved_tensors: the step never edits them in place

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor, g_log_jac: torch.Tensor):
        fixed, grads, g_s = ctx.fixed, [], g_log_jac.unsqueeze(1)  # log|det J| = sum over blocks of sum s + log_scale
        for i in reversed(range(len(ctx.parts))):
            (x1, x2, hidden, t, e, u), part = ctx.saved[i], ctx.parts[i]
            if part.perm.dtype == torch.long:  # x_next[:, j] = v[:, perm[j]], so g_v[:, perm[j]] = g[:, j]
                g = torch.empty_like(g).scatter_(1, part.perm.expand(len(g), -1), g)
            else:  # x_next = v @ perm
                g = g @ part.perm.T
            g_offset, g_scale = g.sum(dim=0), (g * u).sum(dim=0)
            g_x1, g_y2 = (g * part.scale).split([fixed.c1, x2.shape[1]], dim=1)
            g_x2 = g_y2 * e
            g_s_t = torch.addcmul(g_s, g_x2, x2).mul_(1 - t * t).mul_(part.clamp)  # through exp, then clamp * tanh
            g_a = torch.cat((g_s_t, g_y2), dim=1).mul_(0.1)  # a = 0.1 (hidden @ w2.T + b2)
            g_pre = torch.ops.aten.threshold_backward(torch.mm(g_a, part.w2), hidden, 0)  # the ReLU's (autograd's op)
            if i or ctx.needs_input_grad[0]:
                g = torch.cat((torch.addmm(g_x1, g_pre, part.w_x.T), g_x2), dim=1)
            g_w2, g_wx = torch.mm(g_a.T, hidden), torch.mm(x1.T, g_pre).T
            grads.append((g_pre, g_wx, g_w2, g_a.sum(dim=0), g_scale, g_offset))
        g_pre, g_wx, g_w2, g_b2, g_scale, g_offset = (list(reversed(part)) for part in zip(*grads, strict=True))
        g_addend = torch.cat(g_pre, dim=1)  # through the gathers and the two tables (their products, the bias)
        g_along_x = g_addend.new_zeros(len(fixed.pos_x), g_addend.shape[1]).index_add_(0, ctx.ix, g_addend)
        g_along_y = g_addend.new_zeros(len(fixed.pos_y), g_addend.shape[1]).index_add_(0, ctx.iy, g_addend)
        g_b1 = g_addend.sum(dim=0).split(len(hidden[0]))
        g_wc = torch.cat((g_along_x.T @ fixed.pos_x, g_along_y.T @ fixed.pos_y), dim=1).split(len(hidden[0]))
        g_w1 = [torch.cat(pair, dim=1) for pair in zip(g_wx, g_wc, strict=True)]
        layers = [t for layer in zip(g_w1, g_b1, g_w2, g_b2, g_offset, strict=True) for t in layer]
        g_x = g if ctx.needs_input_grad[0] else None
        return g_x, None, None, None, torch.cat(g_scale), g_log_jac.sum().expand(len(g_w1)), *layers
