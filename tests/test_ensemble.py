"""PETS's probabilistic ensemble (lit_meta.rl.ensemble): the Gaussian NLL against a hand-written one, the batched
members against separate plain MLPs, fitting, checkpoints, planning with it on the drift env."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lit_meta.datamodules.rollouts import RolloutDataModule
from lit_meta.rl import PETS, GaussianEnsemble
from lit_meta.rl.ensemble import gaussian_nll
from rl_fakes import ENV_ID

# the drift env (tests/rl_fakes.py): x' = x + a + c; the model sees the action only (both observation dims left out)
DIMS = dict(obs_dim=2, action_dim=1, exclude_obs_dims=[0, 1], aggregate_every_n_epochs=0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one torch thread (several only contend on shared cores), restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def drift_data(**kwargs) -> RolloutDataModule:
    args = dict(env_id=ENV_ID, env_kwargs={"change_every": 25}, past_window=8, future_window=8, initial_rollouts=8,
                rollout_length=50, val_rollouts=2, n_envs=4, meta_batch_size=16, steps_per_epoch=40,
                eval_episodes=40, eval_meta_batch_size=20, seed=3, batch_type="transitions")
    return RolloutDataModule(**{**args, **kwargs})


def bounded(raw: torch.Tensor, net: GaussianEnsemble) -> torch.Tensor:
    """PETS's soft bounds, written out."""
    logvar = net.max_logvar - torch.log1p(torch.exp(net.max_logvar - raw))
    return net.min_logvar + torch.log1p(torch.exp(logvar - net.min_logvar))


def test_gaussian_nll_equals_the_normal_log_density():
    torch.manual_seed(0)
    mean, logvar, target = torch.randn(3, 7, 4), torch.randn(3, 7, 4), torch.randn(3, 7, 4)
    expected = -torch.distributions.Normal(mean, torch.exp(0.5 * logvar)).log_prob(target)
    torch.testing.assert_close(gaussian_nll(mean, logvar, target), expected)


def test_batched_members_equal_separate_plain_mlps():
    torch.manual_seed(0)
    net = GaussianEnsemble(3, 2, hidden=(8, 8), n_members=4)
    with torch.no_grad():  # bounds away from their initial values, so they matter
        net.max_logvar.copy_(torch.tensor([0.3, -1.0]))
        net.min_logvar.copy_(torch.tensor([-2.0, -3.0]))
    x = torch.randn(5, 6, 3)
    mean, logvar = net(x)
    assert mean.shape == logvar.shape == (4, 5, 6, 2)
    per_member = torch.randn(4, 6, 3)
    pm_mean, pm_logvar = net(per_member, per_member=True)
    for m in range(4):
        plain = net.member(m)
        assert [type(layer).__name__ for layer in plain] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
        out = plain(x)
        torch.testing.assert_close(mean[m], out[..., :2])
        torch.testing.assert_close(logvar[m], bounded(out[..., 2:], net))
        out = plain(per_member[m])
        torch.testing.assert_close(pm_mean[m], out[..., :2])
        torch.testing.assert_close(pm_logvar[m], bounded(out[..., 2:], net))
    assert (logvar < net.max_logvar).all() and (logvar > net.min_logvar).all()


def test_learner_loss_is_the_members_nll_plus_the_bound_penalty():
    torch.manual_seed(0)
    model = PETS(GaussianEnsemble(1, 2, hidden=(8,), n_members=3), bootstrap=False, **DIMS)
    x, y = torch.randn(10, 1), torch.randn(10, 2)
    out = model.losses(x, y)
    net = model.net
    nll_by_member = []
    for m in range(3):
        raw = net.member(m)(x)
        mu, lv = raw[:, :2], bounded(raw[:, 2:], net)
        nll_by_member.append((0.5 * ((y - mu) ** 2 / lv.exp() + lv + math.log(2 * math.pi))).mean())
    nll = torch.stack(nll_by_member)
    penalty = 0.01 * (net.max_logvar.sum() - net.min_logvar.sum())
    torch.testing.assert_close(out["nll"], nll.mean())
    torch.testing.assert_close(out["loss"], (2 * nll - math.log(2 * math.pi)).sum() + penalty)
    ens_mean = torch.stack([net.member(m)(x)[:, :2] for m in range(3)]).mean(0)
    torch.testing.assert_close(model.mean_mse(x, y), F.mse_loss(ens_mean, y))
    # predict: the mean over members of their means, per task
    torch.testing.assert_close(model.predict(model.unadapted(1), x[None]), ens_mean[None])
    # bootstrap: every member its own resample of the batch
    model.bootstrap = True
    torch.manual_seed(1)
    assert not torch.equal(model.losses(x, y)["loss"], out["loss"])


def test_ensemble_fits_a_noisy_function_and_learns_its_noise():
    """y = sin(3x) + 0.1 noise: the loss falls, the mean fits, each member's variance approaches 0.01."""
    torch.manual_seed(0)
    model = PETS(GaussianEnsemble(1, 1, hidden=(32, 32), n_members=3), obs_dim=1, action_dim=1,
                 exclude_obs_dims=[0], aggregate_every_n_epochs=0)
    x = torch.rand(512, 1) * 4 - 2
    y = torch.sin(3 * x) + 0.1 * torch.randn(512, 1)
    optimizer = torch.optim.Adam(model.net.parameters(), lr=1e-2)
    first = {**model.losses(x, y), "mse": model.mean_mse(x, y)}
    for _ in range(400):
        loss = model.losses(x, y)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last = {**model.losses(x, y), "mse": model.mean_mse(x, y)}
    assert last["loss"] < first["loss"] - 3 and last["mse"] < 0.03 < first["mse"]
    with torch.no_grad():
        variance = model.net(x)[1].exp().mean()
    assert 0.003 < variance < 0.04


def test_pets_trains_on_transitions_plans_and_reloads(tmp_path):
    from lit_meta.rl.control import evaluate

    L.seed_everything(0)
    mpc = {"planner": "random_shooting", "horizon": 3, "n_candidates": 30}
    model = PETS(GaussianEnsemble(1, 2, hidden=(32, 32), n_members=3), mpc=mpc, **DIMS)
    data = drift_data()
    trainer = L.Trainer(max_epochs=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=2)
    calls, mean_mse = [], model.mean_mse
    model.mean_mse = lambda x, y: calls.append(trainer.global_step) or mean_mse(x, y)
    trainer.fit(model, data)
    # the ensemble-mean MSE (one more forward) only on the steps the loggers record: every 2nd
    assert trainer.global_step >= 4 and calls == list(range(2, trainer.global_step + 1, 2))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["val/pre_query_loss"] == metrics["val/query_loss"]  # nothing adapts
    assert metrics["train/query_loss"] < 2.0 and np.isfinite(metrics["train/nll"])
    result = evaluate(model, ENV_ID, "test", episodes=2, episode_length=20, n_envs=2, past_window=8, future_window=8,
                      **mpc)
    assert len(result["returns"]) == 2 and result["n_nonfinite"] == 0 and np.isfinite(result["returns"]).all()
    assert result["pred_error_pre"] == result["pred_error_post"]
    # a checkpoint rebuilds the same ensemble (benchmarks/model_quality.py loads them)
    trainer.save_checkpoint(tmp_path / "pets.ckpt")
    loaded = PETS.load_from_checkpoint(tmp_path / "pets.ckpt", net=GaussianEnsemble(1, 2, (32, 32), 3),
                                       weights_only=False)
    x = torch.randn(2, 5, 1)
    torch.testing.assert_close(loaded.predict(loaded.unadapted(2), x), model.predict(model.unadapted(2), x))
    # TS propagation plans too
    model.propagation = "ts"
    result = evaluate(model, ENV_ID, "test", episodes=2, episode_length=10, n_envs=2, past_window=8, **mpc)
    assert np.isfinite(result["returns"]).all()


def test_ts_propagation_follows_member_row_index_mod_members():
    torch.manual_seed(0)
    net = GaussianEnsemble(1, 2, hidden=(8,), n_members=3, max_logvar=-40.0, min_logvar=-41.0)  # ~no noise
    model = PETS(net, propagation="ts", **DIMS)
    x = torch.randn(2, 7, 1)
    mean = net(x)[0]
    out = model.predict(model.unadapted(2), x)
    for j in range(7):
        torch.testing.assert_close(out[:, j], mean[j % 3, :, j], atol=1e-6, rtol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="GaussianEnsemble"):
        PETS(net=torch.nn.Linear(1, 2), **DIMS)
    with pytest.raises(ValueError, match="propagation"):
        PETS(propagation="sample", **DIMS)
    with pytest.raises(ValueError, match="min_logvar"):
        GaussianEnsemble(min_logvar=1.0, max_logvar=0.0)
