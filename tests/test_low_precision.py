"""Conv4's all-tasks path (``forward_tasks`` and its custom autograd Functions) in low precision: a net converted with
``.to(torch.bfloat16)`` or ``.half()``, and float32 weights under ``torch.autocast("cpu", dtype=torch.bfloat16)``.
Outputs, per-task gradients and Hessian-vector products against the generic paths in the same precision (``vmap`` of
``functional_call``, a per-task loop of ``net.forward``), all against float64 truth; the 2 x 2 max-pool's indices,
exact integers whatever the map's dtype; the task-folded convolution under autocast."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import half_conv_error

from lit_meta import Conv4
from lit_meta.backends import task_backend
from lit_meta.functional import expand_to_tasks, loss_for, params_of, per_task_loss

LOW = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
# mode: (dtype of the weights and inputs, autocast on)
MODES = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False), "autocast": (torch.float32, True)}
# error floor relative to the largest |truth| of a kind of quantity, 8 units in the last place, on top of twice the
# generic paths' own error (a parameter whose exact derivative is 0 has only rounding noise to compare)
FLOOR = {torch.bfloat16: 2 ** -5, torch.float16: 2 ** -8}


class Wrapped(nn.Module):
    """The same Conv4 seen as an arbitrary module (no ``forward_tasks``): the generic ``vmap`` path."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def episode(mode: str, pool: str, norm: str, size: int = 48):
    """A seeded 3-way Conv4 in the mode's dtype (BatchNorm/GroupNorm scales of both signs), per-task weights,
    2 tasks of 4 images ``size x size`` (a 2304-position first map: pooling indices above 2048), a direction v."""
    dtype, _ = MODES[mode]
    torch.manual_seed(0)
    net = Conv4(out_features=3, hidden=4, pool=pool, norm=norm)
    with torch.no_grad():  # the max-pool blocks' rewrite flips the channels with gamma < 0
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.copy_(torch.tensor([1.5, -0.7, 0.3, -1.2]))
    net = net.to(dtype)
    phi = {k: (v + 0.1 * torch.randn_like(v)).to(dtype) for k, v in expand_to_tasks(params_of(net), 2).items()}
    v = {k: torch.randn_like(p) for k, p in phi.items()}
    x, y = torch.rand(2, 4, 1, size, size).to(dtype), torch.randint(0, 3, (2, 4))
    return net, phi, v, x, y


def quantities(net: nn.Module, phi: dict, v: dict, x: torch.Tensor, y: torch.Tensor, autocast: bool,
               prefix: str = "") -> dict[str, torch.Tensor]:
    """Outputs, per-task gradients and Hessian-vector products by the learners' functional core (Conv4's all-tasks
    path, or ``vmap`` for a wrapped net: its parameters' names start with ``prefix``), in float64. For Conv4 also the
    products by forward-over-reverse (``jvp`` of ``grad``: the custom Functions' forward-mode rules), "jvp ..."."""
    add = lambda d: {prefix + k: t for k, t in d.items()}  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = task_backend(net).outputs(add(phi), x)
        grads, _, _ = task_backend(net).grads_and_outputs(loss_for(y), add(phi), x, y)
        products = task_backend(net).hvp(loss_for(y), add(phi), x, y, add(v))
        if hasattr(net, "forward_tasks"):
            summed = lambda p: per_task_loss(loss_for(y), net.forward_tasks(p, x), y).sum()  # noqa: E731
            forward_mode = torch.func.jvp(torch.func.grad(summed), (phi,), (v,))[1]
    out = {"logits": logits}
    out.update({f"grad {k}": grads[prefix + k] for k in phi})
    out.update({f"hvp {k}": products[prefix + k] for k in phi})
    if hasattr(net, "forward_tasks"):
        out.update({f"jvp {k}": forward_mode[k] for k in phi})
    return {k: t.detach().double() for k, t in out.items()}


def loop_quantities(net: nn.Module, phi: dict, v: dict, x: torch.Tensor, y: torch.Tensor,
                    autocast: bool) -> dict[str, torch.Tensor]:
    """The same by a per-task loop of ``net.forward`` and plain autograd (aten's kernels and double backward)."""
    out: dict[str, list] = {}
    for t in range(x.shape[0]):
        p = {k: w[t].detach().requires_grad_() for k, w in phi.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = torch.func.functional_call(net, p, (x[t],))
            grads = torch.autograd.grad(loss_for(y)(logits, y[t]), list(p.values()), create_graph=True)
            products = torch.autograd.grad(grads, list(p.values()), [v[k][t] for k in p])
        for key, value in [("logits", logits), *((f"grad {k}", g) for k, g in zip(p, grads)),
                           *((f"hvp {k}", h) for k, h in zip(p, products))]:
            out.setdefault(key, []).append(value.detach().double())
    return {k: torch.stack(ts) for k, ts in out.items()}


def compare(mode: str, pool: str, norm: str) -> dict[str, dict[str, float]]:
    """Per path ("all-tasks", "vmap", "loop") and quantity, the max-abs error against float64 truth (the per-task loop
    in float64) over the largest |truth| of its kind (all outputs, all gradients, all products: a parameter whose
    exact gradient is 0, a convolution's bias before BatchNorm, has no scale of its own). The all-tasks path's "jvp"
    products are scored against the same truth as its "hvp" ones. No "vmap" where torch's own vmap path raises."""
    net, phi, v, x, y = episode(mode, pool, norm)
    autocast = MODES[mode][1]
    double = lambda d: {k: t.double() for k, t in d.items()}  # noqa: E731
    truth = loop_quantities(copy.deepcopy(net).double(), double(phi), double(v), x.double(), y, False)
    paths = {"all-tasks": quantities(net, phi, v, x, y, autocast), "loop": loop_quantities(net, phi, v, x, y, autocast)}
    try:
        paths["vmap"] = quantities(Wrapped(net), phi, v, x, y, autocast, prefix="net.")
    except RuntimeError as error:  # torch 2.14: BatchNorm's batched backward under autocast, "expected scalar type
        if not (autocast and norm == "batch"):  # BFloat16 but found Float": nothing to compare with
            raise
        print(f"\nvmap path raises under autocast: {error}")
    scale: dict[str, float] = {}
    for k, t in truth.items():
        scale[k.split()[0]] = max(scale.get(k.split()[0], 0.0), t.abs().max().item())
    truth.update({f"jvp {k[4:]}": t for k, t in truth.items() if k.startswith("hvp ")})
    scale["jvp"] = scale["hvp"]
    return {name: {k: (q[k] - truth[k]).abs().max().item() / scale[k.split()[0]] for k in q}
            for name, q in paths.items()}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("pool, norm", [("max", "batch"), ("stride", "batch"), ("max", "group"), ("max", "none")])
def test_conv4_low_precision_matches_the_generic_path(mode, pool, norm):
    """Conv4's all-tasks path in bfloat16, float16 and under autocast is as close to float64 truth as the generic
    paths in the same precision, ``vmap`` of ``functional_call`` and a per-task loop of ``net.forward``: outputs,
    per-task gradients, Hessian-vector products by double backward and by forward-over-reverse (the custom Functions'
    derivatives of the backward and forward-mode rules), each within twice the larger error of the two, plus a floor
    of a few units of the dtype's last place. Where neither is finite (float16 products through BatchNorm: aten's
    double backward returns NaN, torch 2.14), finite and within 4 times the largest finite error of theirs in the
    episode (their first-order errors: second order, twice as many roundings, twice again), plus the floor."""
    if mode == "fp16" and (reason := half_conv_error()):  # a CPU build without float16 kernels: a clear error
        net, phi, _, x, _ = episode(mode, pool, norm)
        with pytest.raises(RuntimeError):
            net.forward_tasks(phi, x)
        pytest.skip(f"no float16 convolution on this CPU: {reason}")
    floor = FLOOR[torch.bfloat16 if mode == "autocast" else MODES[mode][0]]
    errors = compare(mode, pool, norm)
    fast, references = errors.pop("all-tasks"), list(errors.values())
    finite = [e for r in references for e in r.values() if math.isfinite(e)]
    bad = {}
    for k, e in fast.items():
        own = [r[k.replace("jvp", "hvp", 1)] for r in references]
        bound = max([2 * a for a in own if math.isfinite(a)] or [4 * max(finite)])
        if not e <= bound + floor:
            bad[k] = (e, bound)
    worst = lambda r: max(e for e in r.values() if math.isfinite(e))  # noqa: E731
    print(f"\n{mode} {pool} {norm}: max error / max |truth|: all-tasks {worst(fast):.3g}; " + ", ".join(
        f"{name} {worst(r):.3g}" + (f" ({sum(not math.isfinite(e) for e in r.values())} not finite)"
                                     if not all(map(math.isfinite, r.values())) else "")
        for name, r in errors.items()))
    assert not bad, {k: f"{e:.3g} > {bound:.3g} + {floor:.3g}" for k, (e, bound) in bad.items()}
