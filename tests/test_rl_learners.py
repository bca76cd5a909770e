"""GrBAL / ImplicitGrBAL / ReBAL / MB-MPC: gradients against an autograd unroll, adaptation that lowers the
prediction error on a held-out task, checkpoints, bad input."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.func import functional_call

from lit_meta.datamodules.rollouts import RolloutDataModule
from lit_meta.episode import Transitions, Window
from lit_meta.nets import MLP
from lit_meta.rl.dynamics import open_loop_loss
from lit_meta.rl.learners import MBMPC, GrBAL, ImplicitGrBAL, ReBAL, RecurrentDynamics
from rl_fakes import ENV_ID

# The drift env: x' = x + a + c, c in {0, 3} for training, c = 2 held out. With both observation
# dimensions left out of the input, the model sees only the action: c must come from adaptation.
DIMS = dict(obs_dim=2, action_dim=1, exclude_obs_dims=[0, 1], aggregate_every_n_epochs=0)


def drift_data(**kwargs) -> RolloutDataModule:
    args = dict(env_id=ENV_ID, env_kwargs={"change_every": 25}, past_window=8, future_window=8, initial_rollouts=8,
                rollout_length=50, val_rollouts=2, n_envs=4, meta_batch_size=16, steps_per_epoch=40,
                eval_episodes=40, eval_meta_batch_size=20, seed=3)
    return RolloutDataModule(**{**args, **kwargs})


def fit(model, data, tmp_path, epochs: int = 2) -> dict[str, float]:
    L.seed_everything(0)
    trainer = L.Trainer(max_epochs=epochs, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, data)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}, trainer


def test_grbal_second_order_meta_gradient_equals_an_autograd_unroll():
    torch.manual_seed(0)
    model = GrBAL(MLP(1, 2, (8,)), inner_steps=2, inner_lr=0.3, **DIMS).double()
    window = Window(*(torch.randn(3, n, d, dtype=torch.float64) for n, d in
                      ((4, 2), (4, 1), (4, 2), (5, 2), (5, 1), (5, 2))))
    episode = model.normalizer.episode(window)
    grads = model.task_meta_grads(episode).grads
    theta = dict(model.net.named_parameters())
    for task in range(3):
        phi = dict(theta)
        for _ in range(2):
            loss = ((functional_call(model.net, phi, episode.support_x[task]) - episode.support_y[task]) ** 2).mean()
            step = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
            phi = {k: v - 0.3 * g for (k, v), g in zip(phi.items(), step)}
        query = ((functional_call(model.net, phi, episode.query_x[task]) - episode.query_y[task]) ** 2).mean()
        expected = torch.autograd.grad(query, list(theta.values()))
        for (name, _), e in zip(theta.items(), expected):
            torch.testing.assert_close(grads[name][task], e, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("make", [
    lambda: GrBAL(MLP(1, 2, (32, 32)), inner_steps=1, inner_lr=0.5, **DIMS),
    lambda: ImplicitGrBAL(MLP(1, 2, (32, 32)), lam=0.5, inner_steps=4, inner_lr=0.3, cg_steps=3, **DIMS),
    lambda: ReBAL(RecurrentDynamics(1, 2, 32, (32,)), **DIMS),
], ids=["GrBAL", "ImplicitGrBAL", "ReBAL"])
def test_adaptation_lowers_prediction_error_on_a_held_out_task(make, tmp_path):
    L.seed_everything(0)  # the initial weights too: the result must not depend on the tests run before
    metrics, trainer = fit(make(), drift_data(), tmp_path)
    pre, post = metrics["val/pre_query_loss"], metrics["val/query_loss"]
    assert post < 0.5 * pre, (pre, post)
    # The normalisation statistics are the buffer's, and travel in the checkpoint.
    model = trainer.lightning_module
    torch.testing.assert_close(model.normalizer.delta_mean, trainer.datamodule.stats["delta_mean"])
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = type(model).load_from_checkpoint(path, net=make().net)
    torch.testing.assert_close(loaded.normalizer.delta_std, model.normalizer.delta_std)


def test_mbmpc_trains_on_transitions_and_does_not_adapt(tmp_path):
    metrics, _ = fit(MBMPC(MLP(1, 2, (32, 32)), **DIMS), drift_data(batch_type="transitions"), tmp_path, epochs=1)
    assert metrics["val/pre_query_loss"] == metrics["val/query_loss"]
    assert metrics["train/query_loss"] < 2.0  # the normalised change has variance ~1 around the mean task


def test_open_loop_loss_is_the_rollout_state_error_and_one_step_mse_at_h1():
    torch.manual_seed(0)
    model = MBMPC(MLP(5 + 2, 6, (16,)), obs_dim=6, action_dim=2, exclude_obs_dims=[0]).double()
    norm = model.normalizer
    for name, size in (("obs", 6), ("action", 2), ("delta", 6)):
        getattr(norm, f"{name}_mean").copy_(torch.randn(size))
        getattr(norm, f"{name}_std").copy_(torch.rand(size) + 0.5)
    obs, action = torch.randn(4, 5, 6, dtype=torch.float64), torch.randn(4, 5, 2, dtype=torch.float64)
    next_obs = obs + 0.1 * torch.randn(4, 5, 6, dtype=torch.float64)
    obs[:, 1:] = next_obs[:, :-1]  # consecutive transitions
    inputs, targets = norm.inputs(obs, action), norm.targets(obs, next_obs)
    # by hand: roll the model out in raw observations on the recorded actions, squared state error / delta_std
    x, expected = obs[:, 0], 0.0
    for h in range(5):
        x = norm.next_obs(x, model.net(norm.inputs(x, action[:, h])))
        expected = expected + ((x - next_obs[:, h]) / norm.delta_std).square().mean() / 5
    torch.testing.assert_close(open_loop_loss(model.net, norm, inputs, targets), expected)
    one = open_loop_loss(model.net, norm, inputs[:, :1], targets[:, :1])
    torch.testing.assert_close(one, ((model.net(inputs[:, 0]) - targets[:, 0]) ** 2).mean())


def test_mbmpc_open_loop_loss_trains_on_windows_and_refuses_what_it_cannot_use(tmp_path):
    L.seed_everything(0)
    model = MBMPC(MLP(1, 2, (32, 32)), loss_horizon=4, **DIMS)
    untrained = MLP(1, 2, (32, 32))
    untrained.load_state_dict(model.net.state_dict())
    _, trainer = fit(model, drift_data(), tmp_path, epochs=1)
    # The 4-step open-loop loss on training windows. The model sees only the action, so the best it can do is the
    # mean task, x' - x = a + E[c]: normalised, output = ((a - E[a]) / std(delta_x), 0) (t's change is constant).
    norm = model.normalizer
    window = trainer.datamodule.buffer.sample_windows(256, torch.Generator().manual_seed(0), 8)
    episode = norm.episode(window)

    def mean_task(inputs):
        action = inputs[..., -1:] * norm.action_std + norm.action_mean
        return torch.cat([(action - norm.action_mean) / norm.delta_std[0], torch.zeros_like(action)], dim=-1)

    with torch.no_grad():
        trained, start, best = (open_loop_loss(net, norm, episode.query_x[:, :4], episode.query_y[:, :4])
                                for net in (model.net, untrained, mean_task))
    assert trained < 1.03 * best and start > 1.05 * best, (start, trained, best)
    with pytest.raises(ValueError, match="loss_horizon=0"):
        MBMPC(loss_horizon=0)
    # a DataModule that cannot feed the loss fails when the fit starts, before any rollout is collected
    for data, match in ((drift_data(batch_type="transitions"), r"MBMPC\(loss_horizon=4\) trains on consecutive "
                         r"transitions.*set data.init_args.batch_type=windows"),
                        (drift_data(), r"needs windows of >= 20 transitions, but past_window \+ future_window = 16")):
        with pytest.raises(ValueError, match=match):
            fit(MBMPC(MLP(1, 2, (8,)), loss_horizon=4 if data.batch_type == "transitions" else 20, **DIMS), data,
                tmp_path, epochs=1)
        assert data.round == 0 and not len(data.buffer)
    for learner in (ReBAL(RecurrentDynamics(1, 2, 8, (8,)), **DIMS), GrBAL(MLP(1, 2, (8,)), **DIMS)):
        data = drift_data(batch_type="transitions")
        with pytest.raises(ValueError, match=f"{type(learner).__name__} trains on consecutive transitions"):
            fit(learner, data, tmp_path, epochs=1)
        assert data.round == 0
    # called directly (no DataModule), the loss itself says what is wrong
    with pytest.raises(ValueError, match="batch_type='windows'"):
        model.training_loss(Transitions(torch.randn(4, 2), torch.randn(4, 1), torch.randn(4, 2)))
    with pytest.raises(ValueError, match="longer than the windows"):
        MBMPC(MLP(1, 2, (8,)), loss_horizon=20, **DIMS).training_loss(
            model.normalizer.episode(Window(*(torch.randn(2, 6, d) for d in (2, 1, 2, 2, 1, 2)))))


def test_model_and_env_sizes_must_match(tmp_path):
    with pytest.raises(ValueError, match="obs_dim=18, action_dim=6 but lit_meta_test/Drift-v0 has observations of size 2"):
        fit(GrBAL(), drift_data(), tmp_path)
    from lit_meta.rl.control import evaluate

    with pytest.raises(ValueError, match="trained for observations of size 18 and actions of size 6, but "
                                         "lit_meta_test/Drift-v0 has 2 and 1"):
        evaluate(GrBAL(), ENV_ID, episodes=1, episode_length=5, n_envs=1)
    with pytest.raises(ValueError, match="exclude_obs_dims"):
        GrBAL(obs_dim=2, action_dim=1, exclude_obs_dims=[5])
    with pytest.raises(ValueError, match="RecurrentDynamics"):
        ReBAL(net=MLP(1, 2), **DIMS)


def test_collect_meta_train_adapt_online_evaluate(tmp_path):
    """End to end, seeded: random rollouts -> GrBAL meta-training with one MPC aggregation round ->
    online adaptation + MPC on the held-out task -> returns and prediction errors."""
    from lit_meta.rl.control import evaluate

    mpc = {"planner": "cem", "horizon": 3, "n_candidates": 32, "planner_kwargs": {"iterations": 2, "n_elites": 4}}
    L.seed_everything(0)
    model = GrBAL(MLP(1, 2, (32, 32)), inner_steps=1, inner_lr=0.5, mpc=mpc, **{**DIMS, "aggregate_every_n_epochs": 1})
    data = drift_data(rollouts_per_round=4)
    _, trainer = fit(model, data, tmp_path)
    assert data.round == 2 and len(data.buffer) == 12 * 50  # 8 random + 4 MPC rollouts
    mpc_actions = data.buffer.data("action")[8 * 50:]
    assert mpc_actions.abs().max() <= 1 and not torch.equal(mpc_actions, data.buffer.data("action")[:4 * 50])
    result = evaluate(model, ENV_ID, "test", episodes=3, episode_length=30, n_envs=3, past_window=8, future_window=8,
                      **{k: v for k, v in mpc.items()})
    assert len(result["returns"]) == 3 and result["env_steps"] == 90 and result["n_nonfinite"] == 0
    assert result["pred_error_post"] < 0.5 * result["pred_error_pre"]
    assert np.isfinite(result["returns"]).all()
    # the prediction errors are adapted chunk by chunk (memory): any chunk size gives the same means
    from lit_meta.rl.collect import RolloutCollector
    from lit_meta.rl.control import prediction_errors

    collector = RolloutCollector(ENV_ID, {"task_split": "test"}, n_envs=2)
    rollouts = collector.collect(collector.random_policy(), 0, 0, range(2), 40)
    collector.close()
    whole = prediction_errors(model, rollouts, 8, 8, chunk_size=10_000)
    assert prediction_errors(model, rollouts, 8, 8, chunk_size=7) == pytest.approx(whole, rel=1e-6)


def test_env_without_reward_fn_is_refused():
    from lit_meta.rl.control import env_reward_fns

    with pytest.raises(ValueError, match="CartPole-v1 has no reward_fn"):
        env_reward_fns("CartPole-v1")


def test_action_noise_is_added_to_the_planned_action_clipped_and_seen_by_adaptation():
    """MPCController(action_noise=s): the action taken is clip(planned + s * z), z ~ N(0, 1) from a generator of its
    own (seeded from the rollouts' seeds), so the planner's stream and warm start are those of the noiseless
    controller; adaptation's history holds the action taken."""
    from lit_meta.rl.control import MPCController

    torch.manual_seed(0)
    model = GrBAL(MLP(1, 2, (16,)), inner_steps=1, inner_lr=0.1, **DIMS)
    model.normalizer.set_stats({k: torch.as_tensor(v, dtype=torch.float32) for k, v in {
        "obs_mean": [0.0, 0.0], "obs_std": [1.0, 1.0], "action_mean": [0.0], "action_std": [1.0],
        "delta_mean": [0.0, 0.0], "delta_std": [1.0, 1.0]}.items()})
    reward_fn = lambda obs, action, next_obs: -next_obs[..., 0].abs()  # noqa: E731
    obs = np.array([[0.5, 0.0], [-2.0, 0.0], [4.0, 0.0]], dtype=np.float32)
    kwargs = dict(planner="cem", horizon=3, n_candidates=16, planner_kwargs={"iterations": 2, "n_elites": 4}, seed=5)
    plain = MPCController(model, reward_fn, None, np.array([-1.0]), np.array([1.0]), **kwargs)
    noisy = MPCController(model, reward_fn, None, np.array([-1.0]), np.array([1.0]), action_noise=0.7, **kwargs)
    for c in (plain, noisy):
        c.reset([11, 12, 13])
    z = torch.randn(3, 1, generator=torch.Generator().manual_seed(
        int(np.random.SeedSequence([11, 12, 13]).generate_state(2)[1])))
    for step in range(3):
        planned, taken = plain(obs), noisy(obs)
        if step == 0:  # same planner stream, same state, no history yet: the same plan
            assert np.allclose(taken, np.clip(planned + 0.7 * z.numpy(), -1.0, 1.0), atol=1e-6)
            assert torch.equal(plain.plan, noisy.plan)
        assert np.abs(taken).max() <= 1.0 and not np.allclose(taken, planned)
        assert torch.equal(noisy.history[-1][1], torch.as_tensor(taken))
    again = MPCController(model, reward_fn, None, np.array([-1.0]), np.array([1.0]), action_noise=0.7, **kwargs)
    again.reset([11, 12, 13])
    assert np.array_equal(again(obs), noisy.history[0][1].numpy())  # seeded: the same noise again


def test_datamodule_action_noise_reaches_the_mpc_rounds_only(tmp_path):
    """RolloutDataModule(action_noise=s): the MPC collection rounds take noisy actions, the random rollouts and
    the validation rollouts are those of the noiseless run; a bad value is refused naming the setting."""
    mpc = {"horizon": 3, "n_candidates": 32}
    buffers = {}
    for noise in (0.0, 0.5):
        L.seed_everything(0)
        model = MBMPC(MLP(1, 2, (16,)), mpc=mpc, **{**DIMS, "aggregate_every_n_epochs": 1})
        data = drift_data(rollouts_per_round=2, batch_type="transitions", action_noise=noise)
        fit(model, data, tmp_path / str(noise))
        assert data.round == 2
        buffers[noise] = (data.buffer.data("action"), data.val_buffer.data("obs"))
    (a0, v0), (a1, v1) = buffers[0.0], buffers[0.5]
    assert torch.equal(a0[:8 * 50], a1[:8 * 50]) and torch.equal(v0, v1)
    assert not torch.equal(a0[8 * 50:], a1[8 * 50:]) and a1.abs().max() <= 1.0
    # random shooting's picks are uniform draws, never exactly on a bound; noise past a bound is clipped onto it
    assert (a1[8 * 50:].abs() == 1.0).any() and not (a0[8 * 50:].abs() == 1.0).any()
    for bad in (-0.1, float("nan"), "0.2"):
        with pytest.raises(ValueError, match=r"action_noise=.*must be a finite number >= 0.*data\.init_args"):
            drift_data(action_noise=bad)
