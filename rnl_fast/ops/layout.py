"""How the ops lay tensors out for the kernels: neurons in memory order, time-major ``[T, N]``.

The kernels (docs/architecture.md) see one contiguous block of N neurons per time step, with a time
stride of N or 0. These helpers find that view of an input without copying it when they can:
a channels-last (or any other dense) layout is walked in memory order and the outputs are given
the same layout; the pooling op also needs the two pooled dims next to each other.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def neuron_order(x: Tensor, pool_dims: bool = False) -> tuple[int, ...]:
    """The order of ``x``'s neuron dims (those after T) in memory, outermost first.

    The forward kernels read and write the neurons in this order, so a channels-last tensor (a
    convolution's output on CPU) is used as it lies instead of being copied to NCHW; outputs take
    the same layout. When the neurons are not one dense block in any order, the identity (x gets
    copied). With ``pool_dims`` the last two dims (H, W) must also lie next to each other, H
    outside W, as the pooling kernels need ([outer…, H, W, inner…]); else the identity too.
    """
    n = x.dim() - 1
    identity = tuple(range(n))
    shape, strides = x.shape[1:], x.stride()[1:]
    if x[0].is_contiguous():
        return identity
    order = tuple(sorted(identity, key=lambda d: (-strides[d], d)))
    expected = 1
    for d in reversed(order):
        if shape[d] != 1 and strides[d] != expected:
            return identity
        expected *= shape[d]
    if pool_dims and order.index(n - 1) != order.index(n - 2) + 1:
        return identity
    return order


def in_order(t: Tensor, order: tuple[int, ...], lead: int = 0) -> Tensor:
    """``t`` (``lead`` leading dims, then the neuron dims) with its neuron dims permuted to ``order``."""
    if order == tuple(range(len(order))):
        return t
    return t.permute(*range(lead), *(lead + d for d in order))


def logical(t: Tensor, order: tuple[int, ...], lead: int = 0) -> Tensor:
    """Undoes :func:`in_order`: a view of ``t`` with its neuron dims back in logical order."""
    if order == tuple(range(len(order))):
        return t
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return t.permute(*range(lead), *(lead + d for d in inverse))


def param_in_order(p: Tensor, order: tuple[int, ...]) -> Tensor:
    """A ``[]`` or neuron-shaped threshold/membrane, contiguous in the kernels' neuron order."""
    return p if p.dim() == 0 else in_order(p, order).contiguous()


def time_major(x: Tensor) -> Tensor:
    """``x`` as ``[T, N]`` with neuron stride 1 and time stride N, or 0 for a constant input.

    An input expanded over time (``c.expand(T, *c.shape)``) keeps its stride of 0: the kernels
    read its one row every step instead of a materialised copy.
    """
    T = x.shape[0]
    if T > 1 and x.stride(0) == 0:
        return x[0].contiguous().reshape(1, -1).expand(T, -1)
    x2 = x.contiguous().reshape(T, -1)
    # A dim of size 1 keeps whatever stride it had (a `[1, 2][:, ::2]` view is contiguous with
    # strides (2, 2)); its stride is never used, so give the kernels the dense ones they expect.
    N = x2.shape[1]
    return x2 if x2.stride() == (N, 1) else x2.as_strided((T, N), (N, 1))


def pool_out_size(size: int, ceil_mode: bool) -> int:
    """Windows of 2, stride 2, along a dim of ``size`` (``ceil_mode``: one more for an odd size)."""
    return (size + 1) // 2 if ceil_mode else size // 2


def pool_geometry(x: Tensor, order: tuple[int, ...], ceil_mode: bool):
    """For the neurons of ``x`` in ``order`` ([outer…, H, W, inner…]): their shape, the pooled
    shape in the same order, and ``(planes, H, W, inner)``, planes and inner being the products
    of the outer and inner dims."""
    n = x.dim() - 1
    neuron_shape = torch.Size(x.shape[1 + d] for d in order)
    out = list(x.shape[1:])
    out[-2], out[-1] = pool_out_size(out[-2], ceil_mode), pool_out_size(out[-1], ceil_mode)
    pooled_shape = torch.Size(out[d] for d in order)
    h_at = order.index(n - 2)
    planes, inner = math.prod(neuron_shape[:h_at]), math.prod(neuron_shape[h_at + 2 :])
    return neuron_shape, pooled_shape, (planes, x.shape[-2], x.shape[-1], inner)


def dense_order(x: Tensor) -> tuple[int, ...] | None:
    """The permutation of all of ``x``'s dims, outermost first, under which ``x`` is contiguous
    (identity for a contiguous tensor, ``(0, 2, 3, 1)`` for a channels-last one); None when ``x``
    is not one dense block of memory in any order."""
    order = tuple(sorted(range(x.dim()), key=lambda d: (-x.stride(d), d)))
    return order if x.permute(order).is_contiguous() else None


def flat_in_memory_order(x: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """``x`` walked as it lies: ``(dense, flat, order)``, ``dense`` being ``x`` itself when it is one
    dense block (else a dense copy in ``x``'s stride order, as ``torch.empty_like`` lays it out),
    ``flat = dense.permute(order).view(-1)`` a view of its memory, and ``order`` its
    :func:`dense_order`. Outputs allocated with ``torch.empty_like(dense)`` lie the same way, so
    ``flat_like(out, order)`` walks them in step with ``flat``."""
    order = dense_order(x)
    if order is None:
        x = torch.empty_like(x).copy_(x)
        order = dense_order(x)
        assert order is not None  # empty_like of a non-dense tensor is dense in its stride order
    return x, x.permute(order).reshape(-1), order


def flat_like(t: Tensor, order: tuple[int, ...]) -> Tensor:
    """``t`` (the shape of the ``x`` that gave ``order``) as a flat ``[M]`` in that memory order: a
    view when ``t`` lies as ``x`` does, else a copy."""
    return t.permute(order).contiguous().view(-1)


def channel_inner(x: Tensor, order: tuple[int, ...]) -> int:
    """Elements of one channel (dim 1) that lie next to each other in ``order``: the product of the
    sizes of the dims inside dim 1 (H·W for NCHW, 1 for channels-last or ``[B, F]``). In memory
    order, element i then belongs to channel ``(i // inner) % C``."""
    return math.prod(x.shape[d] for d in order[order.index(1) + 1 :])
