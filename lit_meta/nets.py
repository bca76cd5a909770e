"""Networks used by the few-shot learners, and the check that a module can be batched over tasks.

Any ``nn.Module`` works with the learners as long as it keeps no running statistics (they are
evaluated with ``torch.func.functional_call`` under ``vmap``, one set of weights per task: the
``VmapBackend``); ``Conv4`` also computes all tasks in one forward of its own (a ``FoldedNet``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import FoldedNet
from .kernels import batch_norm, conv_bn_relu_max_pool, grouped_conv, max_pool


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        # No running statistics: every task normalises with its own batch statistics (as MAML/iMAML do).
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm={kind!r} is not one of 'batch', 'group', 'none'")


class Conv4(FoldedNet):
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
        ``[T, B, C, H, W]``: what ``vmap`` of ``functional_call`` computes (this makes Conv4 a
        :class:`~lit_meta.backends.FoldedNet`: the learners run it on the ``FoldedBackend``), but with the tasks folded
        into channels, ``[B, T*C, H, W]``:
        one grouped convolution (``groups=T``) per layer, BatchNorm/GroupNorm over the T*C channels
        (per task and channel, as each copy alone), ReLU/max-pool as they are, a batched head. Under
        ``vmap`` the convolutions' batching rules copy activations between layouts at every layer;
        here they stay in one layout throughout, and no ``vmap`` is involved, so derivatives of any order
        (``grad``, ``jvp`` of ``grad``) run on plain kernels. Some are ours (:mod:`lit_meta.kernels`, each equal to
        the torch op it replaces): the grouped convolution (:func:`~lit_meta.kernels.grouped_conv`), the 2 x 2
        max-pool (:func:`~lit_meta.kernels.max_pool`), BatchNorm (:func:`~lit_meta.kernels.batch_norm`) and the
        max-pool blocks with BatchNorm (:func:`~lit_meta.kernels.conv_bn_relu_max_pool`).
        A subclass that changes ``forward`` must change this too (tests/test_functional.py checks it equals the
        ``vmap`` path). In bfloat16/float16 (a converted net, or float32 under ``torch.autocast``, whose casts the
        convolutions follow) it is as accurate as the ``vmap`` path in that precision (tests/test_low_precision.py):
        integer max-pool indices, BatchNorm statistics in float32 as aten's.
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
                h = conv_bn_relu_max_pool(h, w, b, gamma, beta, conv, norm.eps, n_tasks)
                continue
            h = grouped_conv(h, w, b, conv, n_tasks)
            if isinstance(norm, nn.BatchNorm2d):  # statistics over (B, H, W) per task and channel
                h = batch_norm(h, gamma, beta, norm.eps)
            elif isinstance(norm, nn.GroupNorm):  # a task's groups never straddle two tasks
                h = F.group_norm(h, n_tasks * norm.num_groups, gamma, beta, norm.eps)
            if pooled:  # relu(max_pool) = max_pool(relu): ReLU is monotone, on a quarter of the values
                h = max_pool(h)
            h = F.relu(h)
        features = h.mean(dim=(-2, -1)).view(batch, n_tasks, -1).transpose(0, 1)  # [T, B, hidden]
        return torch.baddbmm(p["head.bias"].unsqueeze(1), features, p["head.weight"].transpose(1, 2))


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
