"""Sinusoid regression tasks: shapes, ranges, and the function each task is drawn from."""

import math

import pytest
import torch

from lit_meta.datamodules import SinusoidDataModule, SinusoidTasks, episode_generator


def test_shapes_and_ranges():
    dm = SinusoidDataModule(k_shot=5, k_query=7, meta_batch_size=4)
    ep = next(iter(dm.train_dataloader()))
    assert ep.support_x.shape == (4, 5, 1) and ep.query_y.shape == (4, 7, 1)
    assert ep.support_x.dtype == torch.float32
    assert ep.support_x.abs().max() <= 5 and ep.query_y.abs().max() <= 5


def test_points_follow_the_task_function():
    source = SinusoidTasks(10, 10, amplitude=(2.0, 2.0), phase=(0.5, 0.5))
    ep = source(episode_generator(0, 0), 3, slice(None))
    assert torch.allclose(ep.support_y, 2.0 * torch.sin(ep.support_x - 0.5))
    assert torch.allclose(ep.query_y, 2.0 * torch.sin(ep.query_x - 0.5))


def test_support_and_query_share_one_function_per_task():
    source = SinusoidTasks(50, 50)
    ep = source(episode_generator(1, 0), 4, slice(None))
    for i in range(4):  # recover amplitude and phase from the support set, predict the query set
        xs, ys = ep.support_x[i, :, 0].double(), ep.support_y[i, :, 0].double()
        basis = torch.stack([torch.sin(xs), torch.cos(xs)], 1)
        coef = torch.linalg.lstsq(basis, ys[:, None]).solution
        xq = ep.query_x[i, :, 0].double()
        pred = torch.stack([torch.sin(xq), torch.cos(xq)], 1) @ coef
        assert torch.allclose(pred[:, 0], ep.query_y[i, :, 0].double(), atol=1e-4)
        assert 0.1 - 1e-4 <= coef.norm() <= 5 + 1e-4


def test_seeded():
    a = SinusoidDataModule(seed=3).dataset("train")[(0, 0)]
    b = SinusoidDataModule(seed=3).dataset("train")[(0, 0)]
    c = SinusoidDataModule(seed=4).dataset("train")[(0, 0)]
    assert torch.equal(a.support_x, b.support_x) and not torch.equal(a.support_x, c.support_x)


@pytest.mark.parametrize("kwargs, message", [
    ({"k_shot": 0}, "k_shot=0 must be a positive integer"),
    ({"amplitude": (5.0, 0.1)}, r"amplitude=\(5.0, 0.1\) must be \(low, high\) with low <= high"),
    ({"steps_per_epoch": -3}, "steps_per_epoch=-3 must be a positive integer"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SinusoidDataModule(**kwargs)
