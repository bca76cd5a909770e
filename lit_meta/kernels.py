"""Custom autograd kernels of ``Conv4.forward_tasks`` (tasks folded into channels), each equal to a plain torch op in
values and derivatives of every order (forward mode included), faster where that op's CPU kernel or derivative is slow:

  grouped_conv            ``F.conv2d(groups=T)`` whose double backward is two grouped convolution-backward calls
                          (torch's runs one convolution per group for the weight term)
  max_pool                ``F.max_pool2d(x, 2, ceil_mode=True)`` with a vectorised forward (aten's is scalar for
                          contiguous ``[B, C, H, W]`` maps)
  batch_norm              ``F.batch_norm(training=True)`` whose double backward is written out in a few passes
  conv_bn_relu_max_pool   a max-pool block, ``relu(max_pool(batch_norm(conv(x))))``, with the affine map and the ReLU
                          on the pooled quarter of the map and one fused pooling + statistics Function

Which of them pay, measured against the plain ops on Conv-4 meta-gradients, and the measurements behind each design
choice: docs/kernels.md (``benchmarks/kernels.py``). Tests: tests/test_kernels.py.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["grouped_conv", "max_pool", "batch_norm", "conv_bn_relu_max_pool"]


# --------------------------------------------------------------------------- grouped convolution

def grouped_conv(x: Tensor, w: Tensor, b: Tensor, conv: nn.Conv2d, groups: int) -> Tensor:
    """``F.conv2d(x, w, b, stride=conv.stride, padding=conv.padding, groups=groups)``, the same values and derivatives
    of every order, with a double backward (every Hessian-vector product and second-order MAML step) of two grouped
    convolution-backward calls, see :class:`_GroupedConv`. Under autocast the operands are cast first, as F.conv2d's
    (the casts differentiated as autograd's)."""
    return _GroupedConv.apply(*_autocast_operands(x, w, b), tuple(conv.stride), tuple(conv.padding), groups)


def _autocast_operands(*tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` cast to autocast's lower-precision dtype where autocast is on for their device (as it casts
    ``F.conv2d``'s operands), else as they are."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    return tuple(t.to(torch.get_autocast_dtype(device)) for t in tensors)


def _no_autocast(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``x``'s device: a custom Function's convolutions run in its operands' one dtype, in the forward
    and in every derivative (autocast's own casts, where wanted, go before the Function: see :func:`grouped_conv`)."""
    device = x.device.type
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()


def _conv_backward(g: Tensor, x: Tensor, w: Tensor, stride: tuple, padding: tuple, groups: int,
                   mask: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(d/dx, d/dw, d/db) of ``<g, conv2d(x, w, b)>``, those asked for by ``mask`` (the others None). Where d/dx is
    not asked for (the first layer, whose input is the data), d/db is g summed per channel by :func:`_channel_sum`
    rather than aten's bias term, which slows aten's weight-gradient kernel there (one input channel per group);
    where d/dx is asked for, aten's is as fast (docs/kernels.md)."""
    separate_bias = mask[2] and not mask[0]
    d_x, d_w, d_b = torch.ops.aten.convolution_backward(
        g, x, w, [w.shape[0]], list(stride), list(padding), [1, 1], False, [0, 0], groups,
        [mask[0], mask[1], mask[2] and mask[0]])
    return d_x, d_w, _channel_sum(g).to(g.dtype) if separate_bias else d_b


def _like(t: Tensor | None, x: Tensor) -> Tensor | None:
    """A tangent ``t`` in its primal's dtype, that of ``x`` (aten's forward-mode rules under autocast, GroupNorm's,
    can give float32 tangents of bfloat16 values), or None."""
    return t.to(x.dtype) if t is not None else None


def _conv_like(ctx, x: Tensor, w: Tensor) -> Tensor:
    """conv2d(x, w) without bias, with the stride, padding and groups saved on ``ctx`` (the derivatives'
    convolutions)."""
    with _no_autocast(x):
        return F.conv2d(x, w, stride=ctx.stride, padding=ctx.padding, groups=ctx.groups)


class _GroupedConv(torch.autograd.Function):
    """y = conv2d(x, w, b): forward and backward are aten's; the backward is :class:`_GroupedConvBackward`, so
    derivatives of the backward are grouped kernels too."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor, stride: tuple, padding: tuple, groups: int) -> Tensor:
        with _no_autocast(x):
            return F.conv2d(x, w, b, stride=stride, padding=padding, groups=groups)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, w, _, ctx.stride, ctx.padding, ctx.groups = inputs
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        mask = tuple(ctx.needs_input_grad[:3])
        return (*_GroupedConvBackward.apply(g, x, w, ctx.stride, ctx.padding, ctx.groups, mask), None, None, None)

    @staticmethod
    def jvp(ctx, t_x: Tensor | None, t_w: Tensor | None, t_b: Tensor | None, *_) -> Tensor:
        x, w = ctx.saved_tensors
        t_x, t_w, t_b = (_like(t, x) for t in (t_x, t_w, t_b))
        conv = functools.partial(_conv_like, ctx)
        terms = [conv(t_x, w) if t_x is not None else None, conv(x, t_w) if t_w is not None else None,
                 t_b[:, None, None] if t_b is not None else None]
        return sum(t for t in terms if t is not None)


class _GroupedConvBackward(torch.autograd.Function):
    """(gx, gw, gb) = the vector-Jacobian product of conv2d at (x, w) with g. Its own derivatives (as aten's
    ``_convolution_double_backward``), each a grouped kernel: d/dg = conv(ggx, w) + conv(x, ggw) + ggb;
    d/dx = input gradient of conv(., ggw) at g; d/dw = weight gradient of conv(ggx, .) at g."""

    @staticmethod
    def forward(g: Tensor, x: Tensor, w: Tensor, stride: tuple, padding: tuple, groups: int,
                mask: tuple[bool, bool, bool]):
        return _conv_backward(g, x, w, stride, padding, groups, mask)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        g, x, w, ctx.stride, ctx.padding, ctx.groups, ctx.mask = inputs
        ctx.save_for_backward(g, x, w)
        ctx.save_for_forward(g, x, w)

    @staticmethod
    def backward(ctx, ggx: Tensor | None, ggw: Tensor | None, ggb: Tensor | None):
        g, x, w = ctx.saved_tensors
        need_g, need_x, need_w = ctx.needs_input_grad[:3]
        conv = functools.partial(_conv_like, ctx)
        d_g = d_x = d_w = None
        if need_g:
            terms = [conv(ggx, w) if ggx is not None else None, conv(x, ggw) if ggw is not None else None,
                     ggb[:, None, None].expand_as(g) if ggb is not None else None]
            d_g = sum(t for t in terms if t is not None) if any(t is not None for t in terms) else None
        if need_x and ggw is not None:
            d_x = _conv_backward(g, x, ggw, ctx.stride, ctx.padding, ctx.groups, (True, False, False))[0]
        if need_w and ggx is not None:
            d_w = _conv_backward(g, ggx, w, ctx.stride, ctx.padding, ctx.groups, (False, True, False))[1]
        return d_g, d_x, d_w, None, None, None, None

    @staticmethod
    def jvp(ctx, t_g: Tensor | None, t_x: Tensor | None, t_w: Tensor | None, *_):
        g, x, w = ctx.saved_tensors
        t_g, t_x, t_w = (_like(t, x) for t in (t_g, t_x, t_w))
        out: list[Tensor | None] = [None, None, None]
        # gx is linear in (g, w), gw in (g, x), gb in g: each tangent feeds the outputs that depend on it
        for args, feeds in (((t_g, x, w), (True, True, True)), ((g, t_x, w), (False, True, False)),
                            ((g, x, t_w), (True, False, False))):
            mask = tuple(m and f for m, f in zip(ctx.mask, feeds))
            if any(a is None for a in args) or not any(mask):
                continue
            for i, d in enumerate(_conv_backward(*args, ctx.stride, ctx.padding, ctx.groups, mask)):
                if d is not None and mask[i]:
                    out[i] = d if out[i] is None else out[i] + d
        return tuple(out)


# --------------------------------------------------------------------------- per-channel statistics

def _accumulation_dtype(x: Tensor) -> torch.dtype | None:
    """float32 for a bfloat16/float16 ``x`` (aten's accumulation type, in which BatchNorm keeps its statistics), else
    None (x's own)."""
    return torch.float32 if torch.finfo(x.dtype).bits < 32 else None


def _channel_sum(x: Tensor) -> Tensor:
    """Sum per channel (dim 1) of ``[B, C, H, W]`` over dims 0, 2, 3, as two contiguous reductions (faster on CPU than
    one over dims (0, 2, 3) at once); in float32 for a bfloat16/float16 x."""
    return x.sum((2, 3), dtype=_accumulation_dtype(x)).sum(0)


def _channel_mean(x: Tensor) -> Tensor:
    """Mean per channel (dim 1) of ``[B, C, H, W]`` over dims 0, 2, 3 (see :func:`_channel_sum`)."""
    return _channel_sum(x) / (x.numel() // x.shape[1])


class _ChannelStats(torch.autograd.Function):
    """Mean and biased variance per channel (dim 1) of ``[B, C, H, W]``, over dims 0, 2, 3: BatchNorm's training
    statistics, as ``torch.var_mean(x, (0, 2, 3), correction=0)`` (slower on CPU, with a backward of half a dozen
    passes over the map). This backward is two passes (``x - mean``, an ``addcmul``) and is itself differentiable
    (Hessian-vector products take its derivative). Two passes, as BatchNorm: the mean, then the squared norm of
    ``x - mean`` (no cancellation where |mean| >> std)."""

    @staticmethod
    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        mean = _channel_mean(x)
        var = torch.linalg.vector_norm(x - mean[:, None, None], dim=(2, 3)).square().sum(0) / (x.numel() // x.shape[1])
        return mean, var

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0], output[0])
        ctx.save_for_forward(inputs[0], output[0])

    @staticmethod
    def backward(ctx, g_mean: Tensor, g_var: Tensor) -> Tensor:
        return _channel_stats_vjp(*ctx.saved_tensors, g_mean, g_var)

    @staticmethod
    def jvp(ctx, t: Tensor) -> tuple[Tensor, Tensor]:
        return _channel_stats_jvp(*ctx.saved_tensors, t)


def _channel_stats_vjp(x: Tensor, mean: Tensor, g_mean: Tensor, g_var: Tensor) -> Tensor:
    """d/dx of ``<g_mean, mean(x)> + <g_var, var(x)>`` = (g_mean + 2 g_var (x - mean)) / n: differentiable under grad
    mode (a backward that is itself differentiated), else in place on one fresh buffer (three vectorised passes; an
    ``addcmul`` with two per-channel operands is not vectorised)."""
    n = x.numel() // x.shape[1]
    # centred first: x * scale - mean * scale would lose the centred part to float32 cancellation if |mean| >> std
    centred, scale, shift = x - mean[:, None, None], (2 * g_var / n)[:, None, None], (g_mean / n)[:, None, None]
    if torch.is_grad_enabled():
        return torch.addcmul(shift, centred, scale)
    return centred.mul_(scale).add_(shift)


def _channel_stats_jvp(x: Tensor, mean: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Tangents of (mean, var) of x along t."""
    t_mean = _channel_mean(t)
    return t_mean, 2 * (_channel_mean(x * t) - mean * t_mean)


# --------------------------------------------------------------------------- 2 x 2 max-pool

def max_pool(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 2, ceil_mode=True)`` of ``[B, C, H, W]``: the same values, derivatives and tie-breaking (the
    first maximum of a window in row-major order), with a vectorised forward, see :class:`_MaxPool2x2`."""
    return _MaxPool2x2.apply(x)[0]


class _MaxPool2x2(torch.autograd.Function):
    """2 x 2 max-pool, stride 2, ceil mode. aten's kernel for contiguous ``[B, C, H, W]`` is scalar; this forward is
    three maxima of the four strided corner views and the same flat indices from three differences (see
    :func:`_max_pool_2x2`), so the backward, its double backward (HVPs) and the forward mode are aten's own
    ``max_pool2d_with_indices_backward`` and gathers."""

    @staticmethod
    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        return _max_pool_2x2(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(inputs[0], output[1])
        ctx.save_for_forward(output[1])

    @staticmethod
    def backward(ctx, g: Tensor, _: Tensor) -> Tensor:
        return _max_pool_vjp(g, *ctx.saved_tensors)

    @staticmethod
    def jvp(ctx, t: Tensor) -> tuple[Tensor, None]:
        return _max_pool_jvp(t, *ctx.saved_tensors), None


def _max_pool_2x2(x: Tensor) -> tuple[Tensor, Tensor]:
    """Values and aten's flat indices (``h * width + w``, the first maximum of a window in row-major order) of the
    2 x 2, stride 2, ceil-mode max-pool of a finite ``[B, C, H, W]`` map. Each "is the later corner larger" test is
    the sign of a difference to a maximum already taken (``max(a, b) - a`` is > 0 exactly where b > a, else 0): one
    vectorised subtraction where a comparison writes booleans one element at a time and must be cast to float."""
    height, width = x.shape[-2:]
    if height % 2 or width % 2:  # ceil mode: a last row/column of the lowest finite value, never a window's maximum
        x = F.pad(x, (0, width % 2, 0, height % 2), value=torch.finfo(x.dtype).min)
    a, b, c, d = x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    top, bottom = torch.maximum(a, b), torch.maximum(c, d)
    out = torch.maximum(top, bottom)
    right_top, right_bottom, lower = (top - a).sign_(), (bottom - c).sign_(), (out - top).sign_()  # 0. or 1.
    rows, cols = out.shape[-2:]
    corner = (torch.arange(rows, device=x.device) * 2 * width)[:, None] + torch.arange(0, 2 * cols, 2, device=x.device)
    # A NaN never makes an index leave its window, which the backward would write through: torch.sign(NaN) is 0
    # ((0 < a) - (a < 0), on CPU and CUDA; tested)
    if torch.finfo(x.dtype).bits < 32:  # bfloat16/float16: integers above 256/2048 not exact, so int64 throughout
        index = torch.where(lower.bool(), right_bottom.long() + width, right_top.long())
        return out, index.add_(corner)
    # exact small integers (float32: below 2^24)
    index = torch.lerp(right_top, right_bottom.add_(width), lower)
    return out, index.add_(corner.to(x.dtype)).long()


def _max_pool_vjp(g: Tensor, x: Tensor, index: Tensor) -> Tensor:
    """d/dx of ``<g, max_pool(x)>``: g at each window's maximum (aten's kernel, differentiable: a gather)."""
    return torch.ops.aten.max_pool2d_with_indices_backward(g, x, [2, 2], [2, 2], [0, 0], [1, 1], True, index)


def _max_pool_jvp(t: Tensor, index: Tensor) -> Tensor:
    """Tangent of max_pool(x) along t: t at each window's maximum."""
    return t.flatten(-2).gather(-1, index.flatten(-2)).view(index.shape)


# --------------------------------------------------------------------------- the fused max-pool block

class _PooledStats(torch.autograd.Function):
    """(max_pool(x), its indices, mean(x), var(x)) of a max-pool block's convolution output x ``[B, C, H, W]``, with
    the statistics of :class:`_ChannelStats` and the pooling of :class:`_MaxPool2x2`. One Function so that the
    backward builds d/dx in one buffer: the statistics' term, centred, with the pooled gradient added at the maxima
    (``scatter_add_``) in place, where two Functions would each write a full map (aten's max-pool backward zeroes
    one) and autograd would add them up, three more passes over the largest map of the net. Under ``create_graph``
    (Hessian-vector products) the same sum, written with differentiable operations. For a bfloat16/float16 map the
    pooled values and statistics come in float32 (their gradients too: d/dx is rounded once, as by aten's BatchNorm)."""

    @staticmethod
    def forward(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        (pooled, index), (mean, var) = _max_pool_2x2(x), _ChannelStats.forward(x)
        return pooled.to(mean.dtype), index, mean, var

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(inputs[0], output[1], output[2])
        ctx.save_for_forward(inputs[0], output[1], output[2])

    @staticmethod
    def backward(ctx, g: Tensor, _: Tensor, g_mean: Tensor, g_var: Tensor) -> Tensor:
        x, index, mean = ctx.saved_tensors
        d_x = _channel_stats_vjp(x, mean, g_mean, g_var)
        if torch.is_grad_enabled():  # the backward is itself differentiated
            return d_x + _max_pool_vjp(g, x.to(g.dtype), index)
        g = g.reshape(index.shape).flatten(-2).to(d_x.dtype)  # (d_x in float32 for a bfloat16/float16 map)
        d_x.flatten(-2).scatter_add_(-1, index.flatten(-2), g)  # g at the maxima
        return d_x

    @staticmethod
    def jvp(ctx, t: Tensor) -> tuple[Tensor, None, Tensor, Tensor]:
        x, index, mean = ctx.saved_tensors
        return (_max_pool_jvp(t, index).to(mean.dtype), None, *_channel_stats_jvp(x, mean, t))


def conv_bn_relu_max_pool(h: Tensor, w: Tensor, b: Tensor, gamma: Tensor, beta: Tensor, conv: nn.Conv2d,
                          eps: float, groups: int) -> Tensor:
    """A max-pool block, ``F.relu(F.max_pool2d(F.batch_norm(F.conv2d(h, w, b, stride=conv.stride,
    padding=conv.padding, groups=groups), None, None, gamma, beta, training=True, eps=eps), 2, ceil_mode=True))``:
    the same values and derivatives, computed with BatchNorm's affine map and the ReLU on the pooled map, a quarter of
    the size, instead of the full one.

    Per channel, ``z -> relu(gamma * (z - mean) / std + beta)`` is monotone, non-decreasing where gamma >= 0 and
    non-increasing where gamma < 0, so it commutes with the max once the channels with gamma < 0 are negated; the
    negation is folded into the convolution (``sign * conv(h; w, b) = conv(h; sign * w, sign * b)``), and the
    statistics are those of the full map (the variance is sign-free, the mean flips with it). Where several inputs
    of a window tie, the original routes the gradient to one of them through a ReLU that is flat there: zero both
    ways. What goes is elementwise work on the full map (normalise, ReLU and their backward and double backward).
    """
    sign = torch.where(gamma >= 0, 1.0, -1.0).to(gamma.dtype)  # a constant: no derivative flows through it
    h = grouped_conv(h, w * sign[:, None, None, None], b * sign, conv, groups)
    pooled, _, mean, var = _PooledStats.apply(h)  # statistics per task and channel, as BatchNorm in training
    scale = gamma * sign * torch.rsqrt(var + eps)
    # scale * (pooled - mean) + beta, centred first: scale * pooled + (beta - mean * scale) would put the gradients of
    # gamma and the mean in float32 cancellation (sum(g * pooled) - mean * sum(g)) where |mean| >> std
    # (in float32 for a bfloat16/float16 map, then back to its dtype, as aten's BatchNorm)
    return F.relu(torch.addcmul(beta[:, None, None], pooled - mean[:, None, None], scale[:, None, None]).to(h.dtype))


# --------------------------------------------------------------------------- BatchNorm

def batch_norm(h: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> Tensor:
    """``F.batch_norm(h, None, None, gamma, beta, training=True, eps=eps)``, the same values and derivatives of every
    order, with a double backward (Hessian-vector products) written out in a few passes, see :class:`_BatchNorm`."""
    return _BatchNorm.apply(h, gamma, beta, eps)[0]


class _BatchNorm(torch.autograd.Function):
    """BatchNorm in training mode. Forward and first-order backward are aten's kernels. When the backward is itself
    to be differentiated (``create_graph``: grad mode on inside it) it is written out instead, for ``y = gamma *
    (x - mean) / std + beta`` (mean and variance from :class:`_ChannelStats`): its derivatives are a few passes over
    the map, where aten's batch-norm double backward takes over a dozen."""

    @staticmethod
    def forward(x: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        return torch.native_batch_norm(x, gamma, beta, None, None, True, 0.0, eps)  # y, mean, 1 / std

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, gamma, _, ctx.eps = inputs
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.save_for_backward(x, gamma, output[1], output[2])
        ctx.save_for_forward(x, gamma, output[1], output[2])

    @staticmethod
    def backward(ctx, g: Tensor, *_: Tensor):
        x, gamma, mean, rstd = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        if not torch.is_grad_enabled():  # first order
            return (*torch.ops.aten.native_batch_norm_backward(g, x, gamma, None, None, mean, rstd, True, ctx.eps,
                                                                mask), None)
        mean, var = _ChannelStats.apply(x)  # again, as functions of x: the backward's own derivatives need them
        rstd = torch.rsqrt(var + ctx.eps)
        centred = x - mean[:, None, None]  # centred before any product: no float32 cancellation where |mean| >> std
        d_beta, d_centred = _channel_sum(g), _channel_sum(g * centred)  # of <g, y>, y = gamma rstd centred
        d_gamma, d_var = rstd * d_centred, -0.5 * gamma * rstd ** 3 * d_centred
        n = x.numel() // x.shape[1]  # through the statistics: (d_mean + 2 d_var (x - mean)) / n, d_mean = -scale d_beta
        d_x = torch.addcmul((-gamma * rstd * d_beta / n)[:, None, None], centred, (2 * d_var / n)[:, None, None])
        return torch.addcmul(d_x, g, (gamma * rstd)[:, None, None]), d_gamma, d_beta, None

    @staticmethod
    def jvp(ctx, t_x: Tensor, t_gamma: Tensor | None, t_beta: Tensor | None, _) -> tuple[Tensor, None, None]:
        x, gamma, mean, rstd = ctx.saved_tensors
        centred = x - mean[:, None, None]
        if t_x is None:
            t_x = torch.zeros_like(x)
        t_mean = _channel_mean(t_x)
        t_rstd = -rstd ** 3 * _channel_mean(centred * t_x)  # -1/2 rstd^3 t_var, t_var = 2 mean(centred * t_x)
        t_y = (gamma * rstd)[:, None, None] * (t_x - t_mean[:, None, None]) + (gamma * t_rstd)[:, None, None] * centred
        if t_gamma is not None:
            t_y = t_y + (rstd * t_gamma)[:, None, None] * centred
        if t_beta is not None:
            t_y = t_y + t_beta[:, None, None]
        return t_y.to(x.dtype), None, None  # (float32 statistics for a bfloat16/float16 x: y is in x's dtype)
