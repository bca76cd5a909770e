"""The custom autograd kernels of lit_meta.kernels (Conv4's task-folded path) against the plain torch ops they equal:
values, derivatives of every order by finite differences (float64), forward mode, ties and NaN in the max-pool, and
the low-precision cases (max-pool indices above what bfloat16/float16 represent, the grouped convolution under
autocast). The whole folded path (Conv4.forward_tasks) is tested in tests/test_functional.py and
tests/test_low_precision.py."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import half_conv_error

from lit_meta.kernels import (_ChannelStats, _GroupedConv, _GroupedConvBackward, _MaxPool2x2, _PooledStats, batch_norm,
                              grouped_conv)

LOW = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
# error floor relative to the largest |truth|, 8 units in the last place (as tests/test_low_precision.py)
FLOOR = {torch.bfloat16: 2 ** -5, torch.float16: 2 ** -8}
FLOAT64 = pytest.mark.usefixtures("float64")  # truth tests: exact up to double rounding


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@FLOAT64
def test_channel_stats_match_var_mean_with_first_second_and_forward_mode_derivatives():
    """The max-pool blocks' BatchNorm statistics (one pass of sums, hand-written backward and jvp) against
    ``torch.var_mean`` and finite differences, float64, including the double backward Hessian products use."""
    torch.manual_seed(0)
    x = (torch.randn(3, 4, 5, 5) * 2 + 1).requires_grad_()
    mean, var = _ChannelStats.apply(x)
    ref_var, ref_mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    assert torch.allclose(mean, ref_mean, atol=1e-13) and torch.allclose(var, ref_var, atol=1e-13)
    assert torch.autograd.gradcheck(_ChannelStats.apply, (x,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(_ChannelStats.apply, (x,))
    # float32, |mean| = 1000 std: E[x^2] - E[x]^2 would lose the variance to cancellation; two passes keep it
    x32 = torch.randn(8, 4, 6, 6, dtype=torch.float32) + 1000.0
    _, var32 = _ChannelStats.apply(x32)
    assert torch.allclose(var32, torch.var_mean(x32.double(), dim=(0, 2, 3), correction=0)[0].float(), rtol=1e-4)


@pytest.mark.parametrize("stride, size", [(1, 4), (2, 5)])
@FLOAT64
def test_grouped_conv_derivatives_of_every_order_match_finite_differences(stride, size):
    """Conv4's task-folded convolution (hand-written double backward: grouped kernels instead of torch's
    one-convolution-per-group loop) against F.conv2d and finite differences, float64: first and second order in
    both modes (Hessian-vector products, forward-over-reverse), and the backward's own derivatives (third order)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, size, size, requires_grad=True)
    w, b = torch.randn(4, 2, 3, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    conv = lambda x, w, b: _GroupedConv.apply(x, w, b, (stride, stride), (1, 1), 2)  # noqa: E731
    assert torch.allclose(conv(x, w, b), F.conv2d(x, w, b, stride=stride, padding=1, groups=2), atol=1e-13)
    assert torch.autograd.gradcheck(conv, (x, w, b), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(conv, (x, w, b), check_fwd_over_rev=True)
    assert torch.autograd.gradgradcheck(lambda w, b: conv(x.detach(), w, b), (w, b))  # data input: no d/dx
    g = torch.randn_like(conv(x, w, b)).requires_grad_()
    backward = lambda g, x, w: _GroupedConvBackward.apply(g, x, w, (stride, stride), (1, 1), 2,  # noqa: E731
                                                          (True, True, True))
    assert torch.autograd.gradcheck(backward, (g, x, w), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(backward, (g, x, w))


@pytest.mark.parametrize("height, width", [(6, 6), (7, 5), (3, 3), (1, 2)])
@FLOAT64
def test_max_pool_equals_aten_with_ties_and_its_derivatives(height, width):
    """Conv4's 2 x 2 max-pool against F.max_pool2d(ceil_mode=True): values and indices on maps full of ties (the
    first maximum of a window wins, as aten), odd sizes (ceil mode), then gradients, double backward, forward mode."""
    torch.manual_seed(0)
    x = torch.randint(-2, 3, (3, 4, height, width)).double()  # few distinct values: many ties
    out, index = _MaxPool2x2.apply(x)
    ref_out, ref_index = F.max_pool2d(x, 2, ceil_mode=True, return_indices=True)
    assert torch.equal(out, ref_out) and torch.equal(index, ref_index)
    g = torch.randn_like(out)
    x.requires_grad_()
    ours = torch.autograd.grad(_MaxPool2x2.apply(x)[0], x, g)[0]
    assert torch.equal(ours, torch.autograd.grad(F.max_pool2d(x, 2, ceil_mode=True), x, g)[0])  # ties routed alike
    xs = torch.randn(2, 3, height, width, requires_grad=True)  # distinct values: differentiable
    pool = lambda t: _MaxPool2x2.apply(t)[0]  # noqa: E731
    assert torch.autograd.gradcheck(pool, (xs,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(pool, (xs,), check_fwd_over_rev=True)


@pytest.mark.parametrize("height, width", [(6, 6), (7, 5)])
@FLOAT64
def test_pooled_stats_equal_max_pool_and_channel_stats_with_their_derivatives(height, width):
    """The max-pool blocks' fused pooling + statistics (one buffer for d/dx in the first-order backward) against the two
    Functions it fuses: the same values and indices, gradients equal to the last bit on maps full of ties (both
    first-order paths: grad mode off in the backward), then finite differences in float64 to second order (the
    create_graph path) and forward mode."""
    torch.manual_seed(0)
    x = torch.randint(-2, 3, (3, 4, height, width)).double().requires_grad_()  # many ties
    pooled, index, mean, var = _PooledStats.apply(x)
    ref_pooled, ref_index = _MaxPool2x2.apply(x)
    ref_mean, ref_var = _ChannelStats.apply(x)
    assert torch.equal(pooled, ref_pooled) and torch.equal(index, ref_index)
    assert torch.equal(mean, ref_mean) and torch.equal(var, ref_var)
    g, g_mean, g_var = torch.randn_like(pooled), torch.randn_like(mean), torch.randn_like(var)
    fused = torch.autograd.grad((pooled * g).sum() + (mean * g_mean).sum() + (var * g_var).sum(), x)[0]
    composed = torch.autograd.grad((ref_pooled * g).sum() + (ref_mean * g_mean).sum() + (ref_var * g_var).sum(), x)[0]
    assert torch.allclose(fused, composed, rtol=0, atol=1e-15)
    xs = (torch.randn(2, 3, height, width) + 2).requires_grad_()  # distinct values: differentiable
    outputs = lambda t: tuple(o for i, o in enumerate(_PooledStats.apply(t)) if i != 1)  # noqa: E731
    assert torch.autograd.gradcheck(outputs, (xs,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(outputs, (xs,), check_fwd_over_rev=True)


@FLOAT64
def test_max_pool_indices_stay_in_their_window_when_the_map_has_nan():
    """A NaN in the map (a diverged step) must not turn into an index outside the map, which the backward would
    write through: NaN values come out as aten's, and every index points into its own 2 x 2 window."""
    x = torch.randn(2, 3, 6, 5)
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 0, 0] = float("nan")
    out, index = _MaxPool2x2.apply(x)
    assert torch.equal(out.isnan(), F.max_pool2d(x, 2, ceil_mode=True).isnan())
    rows, cols = index // 5, index % 5
    assert torch.equal(rows // 2, torch.arange(3)[:, None].expand(3, 3).expand_as(rows))
    assert torch.equal(cols // 2, torch.arange(3)[None, :].expand(3, 3).expand_as(cols))
    torch.autograd.grad(_MaxPool2x2.apply(x.requires_grad_())[0].sum(), x)  # runs


@FLOAT64
def test_batch_norm_equals_aten_with_derivatives_of_every_order():
    """Conv4's training-mode BatchNorm (aten's kernels to first order, written-out backward under create_graph)
    against F.batch_norm and finite differences, float64: first, second and third order, forward mode and
    forward-over-reverse, a map with a large mean."""
    torch.manual_seed(0)
    x = (torch.randn(3, 4, 5, 5) * 2 + 3).requires_grad_()
    gamma, beta = torch.tensor([1.5, -0.7, 0.3, -1.2], requires_grad=True), torch.randn(4, requires_grad=True)
    bn = lambda x, gamma, beta: batch_norm(x, gamma, beta, 1e-5)  # noqa: E731
    assert torch.allclose(bn(x, gamma, beta), F.batch_norm(x, None, None, gamma, beta, training=True, eps=1e-5),
                          atol=1e-13)
    assert torch.autograd.gradcheck(bn, (x, gamma, beta), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(bn, (x, gamma, beta), check_fwd_over_rev=True)
    g = torch.randn(3, 4, 5, 5)  # third order: the written-out backward's own double backward
    assert torch.autograd.gradgradcheck(
        lambda x, gamma: torch.autograd.grad(bn(x, gamma, beta), (x, gamma), g, create_graph=True), (x, gamma))


@LOW
@pytest.mark.parametrize("height, width", [(48, 50), (47, 45)])
def test_max_pool_indices_are_exact_in_low_precision(dtype, height, width):
    """Indices above 256 (bfloat16) or 2048 (float16) are not representable in the map's dtype: the pooling's
    indices, values and gradients must still equal aten's, on maps full of ties, for both Functions that pool."""
    torch.manual_seed(0)
    x = torch.randint(-2, 3, (2, 3, height, width)).to(dtype)  # few distinct values: many ties
    ref_out, ref_index = F.max_pool2d(x, 2, ceil_mode=True, return_indices=True)
    assert ref_index.max() > 2048
    for pooled, index in (_MaxPool2x2.apply(x), _PooledStats.apply(x)[:2]):
        assert index.dtype == torch.int64
        assert torch.equal(pooled, ref_out) and torch.equal(index, ref_index)
    g = torch.randn_like(ref_out)
    x.requires_grad_()
    ref = torch.autograd.grad(F.max_pool2d(x, 2, ceil_mode=True), x, g)[0]
    assert torch.equal(torch.autograd.grad(_MaxPool2x2.apply(x)[0], x, g)[0], ref)
    t = torch.randn_like(x)  # forward mode: the tangent at each window's maximum
    tangent = torch.func.jvp(lambda z: _MaxPool2x2.apply(z)[0], (x.detach(),), (t,))[1]
    assert torch.equal(tangent, t.flatten(-2).gather(-1, ref_index.flatten(-2)).view_as(ref_index))


@LOW
def test_grouped_conv_under_autocast_runs_in_one_dtype_to_every_order(dtype):
    """The task-folded convolution under autocast: Conv4's wrapper casts as autocast casts F.conv2d (the same output
    dtype, values, first and second derivatives as F.conv2d under autocast); the Function called alone computes in
    its operands' dtype (float32 here) in the forward and every derivative, as F.conv2d without autocast."""
    if dtype == torch.float16 and (reason := half_conv_error()):
        pytest.skip(f"no float16 convolution on this CPU: {reason}")
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    w, b = torch.randn(4, 2, 3, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    g = torch.randn(2, 4, 6, 6)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)

    def derivatives(f, autocast: bool) -> list[torch.Tensor]:
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            y = f()
            grads = torch.autograd.grad((y * g).sum(), (x, w, b), create_graph=True)
            second = torch.autograd.grad(sum((d * d).sum() for d in grads[:2]), (x, w))
        return [y, *grads, *second]

    reference = lambda: F.conv2d(x, w, b, padding=1, groups=2)  # noqa: E731
    for ours, ref in [(derivatives(lambda: grouped_conv(x, w, b, conv, 2), True), derivatives(reference, True)),
                      (derivatives(lambda: _GroupedConv.apply(x, w, b, (1, 1), (1, 1), 2), True),
                       derivatives(reference, False))]:
        for a, r in zip(ours, ref):
            assert a.dtype == r.dtype
            assert (a.double() - r.double()).abs().max() <= FLOOR[dtype] / 2 * r.double().abs().max()
