"""Networks used by the few-shot learners, and the check that a module can be batched over tasks.

Any ``nn.Module`` works with the learners as long as it keeps no running statistics (they are
evaluated with ``torch.func.functional_call`` under ``vmap``, one set of weights per task).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        # No running statistics: every task normalises with its own batch statistics (as MAML/iMAML do).
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm={kind!r} is not one of 'batch', 'group', 'none'")


class Conv4(nn.Module):
    """The 4-block convolutional network of MAML/iMAML (Finn et al. 2017; Rajeswaran et al. 2019).

    Each block: conv 3x3 (``hidden`` channels) -> norm -> ReLU -> downsample, where ``pool="stride"``
    uses a stride-2 convolution (MAML's Omniglot net) and ``pool="max"`` a 2x2 max-pool (its
    Mini-ImageNet net). Features are averaged over the remaining spatial positions, then a linear head.

    Args:
        out_features: number of classes (``n_way``). Default 5.
        in_channels: image channels (1 for Omniglot, 3 for Mini-ImageNet). Default 1.
        hidden: channels of every conv block. Default 64.
        pool: ``"stride"`` or ``"max"``. Default ``"stride"``.
        norm: ``"batch"`` (no running statistics), ``"group"`` or ``"none"``. Default ``"batch"``.
    """

    def __init__(
        self,
        out_features: int = 5,
        in_channels: int = 1,
        hidden: int = 64,
        pool: Literal["stride", "max"] = "stride",
        norm: Literal["batch", "group", "none"] = "batch",
    ) -> None:
        super().__init__()
        if pool not in ("stride", "max"):
            raise ValueError(f"pool={pool!r} is not one of 'stride', 'max'")
        for name, value in (("out_features", out_features), ("in_channels", in_channels), ("hidden", hidden)):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        blocks = []
        for i in range(4):
            c_in = in_channels if i == 0 else hidden
            stride = 2 if pool == "stride" else 1
            layers = [nn.Conv2d(c_in, hidden, 3, stride=stride, padding=1), _norm(norm, hidden), nn.ReLU()]
            if pool == "max":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            blocks.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(-2, -1)))

    def forward_tasks(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Outputs ``[T, B, out_features]`` of T copies of this network, copy t with the weights
        ``params[name][t]`` (``[T, *shape]``; a parameter missing from ``params`` is shared), on x
        ``[T, B, C, H, W]``: what ``vmap`` of ``functional_call`` computes (lit_meta.functional uses this
        instead when a network has it), but with the tasks folded into channels, ``[B, T*C, H, W]``:
        one grouped convolution (``groups=T``) per layer, BatchNorm/GroupNorm over the T*C channels
        (per task and channel, as each copy alone), ReLU/max-pool as they are, a batched head. Under
        ``vmap`` the convolutions' batching rules copy activations between layouts at every layer;
        here they stay in one layout throughout, and no ``vmap`` is involved, so derivatives of any order
        (``grad``, ``jvp`` of ``grad``) run on plain kernels. A subclass that changes ``forward`` must change
        this too (tests/test_functional.py checks it equals the ``vmap`` path).
        """
        n_tasks, batch = x.shape[:2]
        p = {name: params[name] if name in params else w.expand(n_tasks, *w.shape)
             for name, w in self.named_parameters()}
        h = x.transpose(0, 1).reshape(batch, n_tasks * x.shape[2], *x.shape[3:])  # task-major channels
        for i, block in enumerate(self.features):
            conv, norm = block[0], block[1]
            w, b = p[f"features.{i}.0.weight"], p[f"features.{i}.0.bias"]
            w, b = w.reshape(-1, *w.shape[2:]), b.reshape(-1)
            pooled = len(block) == 4
            if not isinstance(norm, nn.Identity):
                gamma, beta = p[f"features.{i}.1.weight"].reshape(-1), p[f"features.{i}.1.bias"].reshape(-1)
            if pooled and isinstance(norm, nn.BatchNorm2d):
                h = _conv_bn_relu_max_pool(h, w, b, gamma, beta, conv, norm.eps, n_tasks)
                continue
            h = F.conv2d(h, w, b, stride=conv.stride, padding=conv.padding, groups=n_tasks)
            if isinstance(norm, nn.BatchNorm2d):  # statistics over (B, H, W) per task and channel
                h = F.batch_norm(h, None, None, gamma, beta, training=True, eps=norm.eps)
            elif isinstance(norm, nn.GroupNorm):  # a task's groups never straddle two tasks
                h = F.group_norm(h, n_tasks * norm.num_groups, gamma, beta, norm.eps)
            if pooled:  # relu(max_pool) = max_pool(relu): ReLU is monotone, on a quarter of the values
                h = F.max_pool2d(h, 2, ceil_mode=True)
            h = F.relu(h)
        features = h.mean(dim=(-2, -1)).view(batch, n_tasks, -1).transpose(0, 1)  # [T, B, hidden]
        return torch.baddbmm(p["head.bias"].unsqueeze(1), features, p["head.weight"].transpose(1, 2))


def _channel_mean(x: Tensor) -> Tensor:
    """Mean per channel (dim 1) of ``[B, C, H, W]`` over dims 0, 2, 3, as two contiguous reductions (one over
    dims (0, 2, 3) at once is several times slower on CPU)."""
    return x.sum((2, 3)).sum(0) / (x.numel() // x.shape[1])


class _ChannelStats(torch.autograd.Function):
    """Mean and biased variance per channel (dim 1) of ``[B, C, H, W]``, over dims 0, 2, 3: BatchNorm's training
    statistics. ``torch.var_mean`` over those dims is slow on CPU (~100 ms on a 25 x 2048 x 28 x 28 map) and its
    backward takes half a dozen passes over the map; this backward is one ``addcmul`` and is itself differentiable
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
    def backward(ctx, g_mean: Tensor, g_var: Tensor) -> Tensor:  # d/dx: (g_mean + 2 g_var (x - mean)) / n
        x, mean = ctx.saved_tensors
        n = x.numel() // x.shape[1]
        scale = 2 * g_var / n
        return torch.addcmul((g_mean / n - mean * scale)[:, None, None], x, scale[:, None, None])

    @staticmethod
    def jvp(ctx, t: Tensor) -> tuple[Tensor, Tensor]:
        x, mean = ctx.saved_tensors
        t_mean = _channel_mean(t)
        return t_mean, 2 * (_channel_mean(x * t) - mean * t_mean)


def _conv_bn_relu_max_pool(h: Tensor, w: Tensor, b: Tensor, gamma: Tensor, beta: Tensor, conv: nn.Conv2d,
                           eps: float, groups: int) -> Tensor:
    """``max_pool(relu(batch_norm(conv(h))))`` of a max-pool block, computed with BatchNorm's affine map and the ReLU
    on the pooled map, a quarter of the size, instead of the full one: the same values and derivatives.

    Per channel, ``z -> relu(gamma * (z - mean) / std + beta)`` is monotone, non-decreasing where gamma >= 0 and
    non-increasing where gamma < 0, so it commutes with the max once the channels with gamma < 0 are negated; the
    negation is folded into the convolution (``sign * conv(h; w, b) = conv(h; sign * w, sign * b)``), and the
    statistics are those of the full map (the variance is sign-free, the mean flips with it). Where several inputs
    of a window tie, the original routes the gradient to one of them through a ReLU that is flat there: zero both
    ways. What goes is elementwise work on the full map (normalise, ReLU and their backward and double backward),
    most of a Conv-4 max-pool gradient's memory-bound time on the 28 x 28 layer.
    """
    sign = torch.where(gamma >= 0, 1.0, -1.0).to(gamma.dtype)  # a constant: no derivative flows through it
    h = F.conv2d(h, w * sign[:, None, None, None], b * sign, stride=conv.stride, padding=conv.padding, groups=groups)
    mean, var = _ChannelStats.apply(h)  # per task and channel, as BatchNorm in training
    scale = gamma * sign * torch.rsqrt(var + eps)
    shift = beta - mean * scale
    pooled = F.max_pool2d(h, 2, ceil_mode=True)
    return F.relu(torch.addcmul(shift[:, None, None], pooled, scale[:, None, None]))


class MLP(nn.Module):
    """A ReLU multilayer perceptron (MAML's sinusoid net is ``MLP(1, 1, hidden=(40, 40))``).

    Args:
        in_features: input size. Default 1.
        out_features: output size. Default 1.
        hidden: sizes of the hidden layers. Default (40, 40).
    """

    def __init__(self, in_features: int = 1, out_features: int = 1, hidden: tuple[int, ...] = (40, 40)) -> None:
        super().__init__()
        sizes = [in_features, *hidden, out_features]
        if min(sizes) < 1:
            raise ValueError(f"layer sizes {sizes} must all be >= 1")
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.layers = nn.Sequential(*layers[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def check_functional(net: nn.Module) -> None:
    """Raise ``ValueError`` if ``net`` cannot be run with one set of weights per task.

    Modules that update buffers in ``forward`` (BatchNorm with running statistics) would mix tasks
    and cannot run under ``vmap``.
    """
    for name, module in net.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            raise ValueError(
                f"{type(module).__name__} at '{name or '<root>'}' keeps running statistics, which would mix "
                f"tasks and cannot be batched over tasks. Construct it with track_running_stats=False "
                f"(or use GroupNorm/LayerNorm)."
            )
