"""The batched inner solve against a per-task loop, and the FineTune baseline's behaviour."""

import lightning as L
import pytest
import torch
from torch import nn

from helpers import OneEpisode
from lit_meta import Conv4, Episode, FineTune, MLP, check_functional
from lit_meta.datamodules import SinusoidDataModule
from lit_meta.episode import to_float
from lit_meta.backends import task_backend
from lit_meta.functional import inner_solve, loss_for, params_of


def loop_inner_gd(net, theta, x, y, steps, lr, lam):
    """Reference: one task at a time with torch.autograd, the way the reference code is written."""
    out = []
    for i in range(x.shape[0]):
        phi = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
        for _ in range(steps):
            loss = loss_for(y)(torch.func.functional_call(net, phi, (x[i],)), y[i])
            grads = torch.autograd.grad(loss, list(phi.values()))
            phi = {k: (p - lr * (g + lam * (p - theta[k]))).detach().requires_grad_()
                   for (k, p), g in zip(phi.items(), grads)}
        out.append({k: v.detach() for k, v in phi.items()})
    return {k: torch.stack([o[k] for o in out]) for k in theta}


@pytest.mark.parametrize("lam", [0.0, 2.0])
def test_batched_inner_gd_matches_a_per_task_loop_classification(lam):
    # float64: in float32 BatchNorm over 6 images amplifies rounding to ~1e-4 between any two kernels
    torch.manual_seed(0)
    net = Conv4(out_features=3, hidden=8).double()
    x, y = torch.rand(4, 6, 1, 28, 28, dtype=torch.float64), torch.randint(0, 3, (4, 6))
    theta = params_of(net)
    batched = inner_solve(task_backend(net), loss_for(y), theta, x, y, inner_steps=3, inner_lr=0.1, lam=lam)[0]
    looped = loop_inner_gd(net, theta, x, y, 3, 0.1, lam)
    for k in theta:
        assert torch.allclose(batched[k], looped[k], rtol=0, atol=1e-12), k


def test_inner_gd_closed_form_on_a_quadratic():
    # L(w) = mean((w x - y)^2) with x = 1, y = c: L'(w) = 2 (w - c); the proximal GD step is affine in w,
    # so after n steps w_n = w* + (w_0 - w*) r^n with w* = (2c + lam w_0)/(2 + lam), r = 1 - lr (2 + lam).
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.5)
    c = torch.tensor([1.0, -2.0, 3.0])
    x = torch.ones(3, 4, 1)
    y = c[:, None, None].expand(3, 4, 1)
    lam, lr, n = 0.5, 0.1, 7
    phi = inner_solve(task_backend(net), loss_for(y), params_of(net), x, y, inner_steps=n, inner_lr=lr, lam=lam)[0]
    w_star = (2 * c + lam * 0.5) / (2 + lam)
    expected = w_star + (0.5 - w_star) * (1 - lr * (2 + lam)) ** n
    assert torch.allclose(phi["weight"][:, 0, 0], expected, atol=1e-6)
    assert net.weight.item() == 0.5  # theta untouched


def test_fine_tuning_lowers_the_support_loss_on_sinusoids():
    torch.manual_seed(0)
    ep = SinusoidDataModule(k_shot=10, k_query=10, meta_batch_size=8, seed=0).dataset("train")[(0, 0)]
    net = MLP(hidden=(40, 40))
    support = []
    for steps in (0, 50):
        phi = FineTune(net, inner_steps=steps, inner_lr=0.02).adapt(ep.support_x, ep.support_y)
        support.append(nn.functional.mse_loss(task_backend(net).outputs(phi, ep.support_x), ep.support_y).item())
    assert support[1] < 0.8 * support[0]


def test_running_statistics_are_refused():
    with pytest.raises(ValueError, match=r"BatchNorm2d at 'features.0.1' keeps running statistics.*track_running_stats=False"):
        FineTune(_conv_with_running_stats())
    check_functional(Conv4(norm="group", hidden=8))


def _conv_with_running_stats():
    net = Conv4(hidden=8)
    net.features[0][1] = nn.BatchNorm2d(8)
    return net


def test_uint8_batches_become_float_on_the_device():
    model = FineTune(Conv4(hidden=8))
    ep = Episode(torch.full((2, 5, 1, 28, 28), 255, dtype=torch.uint8), torch.zeros(2, 5, dtype=torch.long),
                 torch.zeros((2, 5, 1, 28, 28), dtype=torch.uint8), torch.zeros(2, 5, dtype=torch.long))
    out = model.on_after_batch_transfer(ep, 0)
    assert out.support_x.dtype == torch.float32 and out.support_x.max() == 1.0
    assert to_float(out).support_x is out.support_x  # floats pass through


def _episode(n_way=5, n_tasks=2):
    y = torch.arange(n_way).repeat(n_tasks, 1)
    x = torch.randint(0, 255, (n_tasks, n_way, 1, 28, 28), dtype=torch.uint8)
    return Episode(x, y, x, y)


def _trainer(**kwargs):
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def test_wrong_number_of_outputs_is_named():
    model = FineTune(Conv4(out_features=3, hidden=8), inner_steps=1)
    with pytest.raises(ValueError, match=r"outputs 3 classes but the episodes are 5-way.*out_features: 5"):
        _trainer(max_epochs=1).fit(model, OneEpisode(_episode()))


def test_max_steps_alone_is_refused():
    model = FineTune(Conv4(hidden=8), inner_steps=1)
    with pytest.raises(ValueError, match=r"trainer.max_steps=5 never ends a FineTune run.*max_epochs"):
        _trainer(max_steps=5).fit(model, OneEpisode(_episode()))


def test_validation_adapts_under_inference_mode_and_does_not_change_weights():
    torch.manual_seed(0)
    model = FineTune(Conv4(hidden=8), inner_steps=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = _trainer(inference_mode=True).validate(model, OneEpisode(_episode()), verbose=False)[0]
    assert {"val/query_loss", "val/query_acc", "val/query_acc_ci95", "val/pre_query_acc"} <= set(metrics)
    assert 0 <= metrics["val/query_acc"] <= 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, message", [({"inner_steps": -1}, "inner_steps=-1 must be >= 0"),
                                             ({"inner_lr": 0.0}, "inner_lr=0.0 must be > 0")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FineTune(Conv4(hidden=8), **kwargs)
