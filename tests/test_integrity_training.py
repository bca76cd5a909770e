"""No silent wrong state in training (issue 24).

A. ``nan_policy="skip"`` has a bound: a step whose every task is skipped raises, and so does more than
   ``max_skip_fraction`` of the tasks skipped over the last ``skip_window`` steps; the decision is taken on
   counts summed over the DDP ranks, so every rank takes the same one.
B. A dynamics learner's ``mpc`` settings (keys, planner name, planner_kwargs, ranges) are checked when the
   learner is built, not after the random rollouts and a whole epoch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lit_meta import IMAML, MAML, MLP, Episode, Reptile
from lit_meta.rl.control import MPCController
from lit_meta.rl.learners import MBMPC, GrBAL, ImplicitGrBAL, ReBAL


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def SGD(params):
    return torch.optim.SGD(params, lr=0.1)


class Episodes(L.LightningDataModule):
    """Serves the given episodes for training, one per step, in order."""

    def __init__(self, episodes: list[Episode]) -> None:
        super().__init__()
        self.episodes = episodes

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.episodes, batch_size=None)


def sine_episode(n_tasks: int = 4, bad: tuple[int, ...] = (), seed: int = 0) -> Episode:
    """A sinusoid-like regression episode (x, y ``[T, 5, 1]``); the support inputs of the tasks ``bad`` are NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_tasks, 5, 1, generator=g) * 6 - 3
    qx = torch.rand(n_tasks, 5, 1, generator=g) * 6 - 3
    support_x = x.clone()
    for t in bad:
        support_x[t] = float("nan")
    return Episode(support_x, torch.sin(x), qx, torch.sin(qx))


class NaNNet(nn.Module):
    """A net whose outputs, hence inner losses, are always NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * float("nan")


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


SKIPPING = {
    "maml": lambda net, **kw: MAML(net, inner_steps=1, inner_lr=0.01, nan_policy="skip", optimizer=SGD, **kw),
    "fomaml": lambda net, **kw: MAML(net, inner_steps=1, inner_lr=0.01, first_order=True, nan_policy="skip",
                                     optimizer=SGD, **kw),
    "reptile": lambda net, **kw: Reptile(net, inner_steps=1, inner_lr=0.01, nan_policy="skip", optimizer=SGD, **kw),
    "imaml": lambda net, **kw: IMAML(net, inner_steps=1, inner_lr=0.01, cg_steps=1, nan_policy="skip",
                                     optimizer=SGD, **kw),
}


# ---------------------------------------------------------------- A. nan_policy="skip" has a bound

@pytest.mark.parametrize("name", SKIPPING)
def test_every_task_skipped_raises_naming_cause_step_and_fix(name):
    """Before: the fit exited normally, every task of every step skipped, parameters unchanged."""
    model = SKIPPING[name](NaNNet(), max_skip_fraction=1.0)  # only the every-task rule can fire
    before = params(model)
    with pytest.raises(FloatingPointError, match=r"(?s)non-finite inner loss or meta-gradient in every "
                                                 r"task \(4 of 4.*global step 0.*inner_lr.*outer learning rate.*"
                                                 r"nan_policy='raise'"):
        trainer(max_steps=2).fit(model, Episodes([sine_episode(seed=s) for s in range(2)]))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no meta-update from nothing


def test_more_than_max_skip_fraction_in_one_step_raises():
    """Before: the fit exited normally with 3 of 4 tasks of every step left out."""
    model = SKIPPING["maml"](MLP(hidden=(8,)))  # defaults: max_skip_fraction 0.5 over the last 50 steps
    with pytest.raises(FloatingPointError, match=r"(?s)3 of 4 tasks \(75%\) of the last 1 training step.*"
                                                 r"max_skip_fraction=0.5.*skip_window=50.*inner_lr"):
        trainer(max_steps=3).fit(model, Episodes([sine_episode(bad=(0, 1, 2), seed=s) for s in range(3)]))
    assert model.trainer.global_step == 0


def test_skip_fraction_is_measured_over_the_last_skip_window_steps():
    """Steps skip 0, 3, 3, 0 of 4 tasks: over the last 2 steps 6 of 8 (75%) > 0.5 raises at the third step;
    over the last 3 steps 6 of 12 (50%) is within the bound. Before: both fits exited normally."""
    episodes = [sine_episode(bad=bad, seed=s) for s, bad in enumerate([(), (0, 1, 2), (1, 2, 3), ()])]
    model = SKIPPING["fomaml"](MLP(hidden=(8,)), max_skip_fraction=0.5, skip_window=2)
    before = params(model)
    with pytest.raises(FloatingPointError, match=r"(?s)6 of 8 tasks \(75%\) of the last 2 training steps.*"
                                                 r"global step 2.*skip_window=2"):
        trainer(max_steps=4).fit(model, Episodes(episodes))
    assert model.trainer.global_step == 2  # two meta-updates, then the error before the third
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    model = SKIPPING["fomaml"](MLP(hidden=(8,)), max_skip_fraction=0.5, skip_window=3)
    trainer(max_steps=4).fit(model, Episodes(episodes))
    assert model.trainer.global_step == 4


@pytest.mark.parametrize("name", SKIPPING)
def test_a_few_skipped_tasks_still_train(name):
    model = SKIPPING[name](MLP(hidden=(8,)))
    before = params(model)
    fit = trainer(max_steps=3)
    fit.fit(model, Episodes([sine_episode(bad=(s % 4,), seed=s) for s in range(3)]))
    assert fit.global_step == 3
    assert all(p.isfinite().all() for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert fit.callback_metrics["train/skipped_tasks"] == 1


@pytest.mark.parametrize("make", [
    lambda **kw: MAML(MLP(hidden=(8,)), **kw), lambda **kw: MAML(MLP(hidden=(8,)), first_order=True, **kw),
    lambda **kw: Reptile(MLP(hidden=(8,)), **kw), lambda **kw: IMAML(MLP(hidden=(8,)), **kw),
    lambda **kw: GrBAL(MLP(1, 2, (8,)), obs_dim=2, action_dim=1, exclude_obs_dims=[0, 1], **kw),
    lambda **kw: ImplicitGrBAL(MLP(1, 2, (8,)), obs_dim=2, action_dim=1, exclude_obs_dims=[0, 1], **kw),
], ids=["maml", "fomaml", "reptile", "imaml", "grbal", "implicit_grbal"])
def test_every_meta_learner_takes_and_checks_the_skip_bound(make):
    model = make(nan_policy="skip", max_skip_fraction=0.25, skip_window=7)
    assert (model.max_skip_fraction, model.skip_window) == (0.25, 7)
    assert (model.hparams["max_skip_fraction"], model.hparams["skip_window"]) == (0.25, 7)  # in the config
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=rf"max_skip_fraction={bad}.*must be in \(0, 1\]"):
            make(max_skip_fraction=bad)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=rf"skip_window={bad}.*must be an int >= 1"):
            make(skip_window=bad)


DDP_SCRIPT = textwrap.dedent('''
    """2 CPU ranks. Step 0: every task of rank 0 is non-finite, rank 1's are fine; step 1: the other way round.
    Summed over the ranks, each step skips 4 of 8 tasks (50%, within max_skip_fraction=0.5): both ranks must
    train on. Deciding on a rank's own counts would stop one rank alone (the other then waits forever)."""
    import sys

    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from lit_meta import MAML, MLP, Episode
    from lit_meta.cli import release_process_group


    def episode(bad, seed):
        g = torch.Generator().manual_seed(seed)
        x, qx = torch.rand(4, 5, 1, generator=g), torch.rand(4, 5, 1, generator=g)
        sx = torch.full_like(x, float("nan")) if bad else x
        return Episode(sx, torch.sin(x), qx, torch.sin(qx))


    class PerRank(L.LightningDataModule):
        def train_dataloader(self):
            rank = self.trainer.global_rank
            return DataLoader([episode(rank == 0, rank), episode(rank == 1, 10 + rank)], batch_size=None)


    if __name__ == "__main__":
        torch.manual_seed(0)
        model = MAML(MLP(hidden=(8,)), inner_steps=1, inner_lr=0.01, first_order=True, nan_policy=sys.argv[2],
                     max_skip_fraction=0.5, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        initial = [p.detach().clone() for p in model.parameters()]
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, use_distributed_sampler=False,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(model, PerRank())
        torch.save({"initial": initial, "final": [p.detach().clone() for p in model.parameters()],
                    "steps": trainer.global_step}, f"{sys.argv[1]}/rank{trainer.global_rank}.pt")
        release_process_group()  # as train.py does (gloo torn down at interpreter exit aborted now and then)
''')


def test_ddp_ranks_decide_on_the_skip_counts_of_all_ranks(tmp_path):
    script = tmp_path / "ddp_skip.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(script), str(tmp_path), "skip"], env=env, cwd=tmp_path, timeout=240,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2
    for a, b, start in zip(ranks[0]["final"], ranks[1]["final"], ranks[0]["initial"]):
        assert torch.equal(a, b) and a.isfinite().all()
    assert not all(torch.equal(a, s) for a, s in zip(ranks[0]["final"], ranks[0]["initial"]))


def test_under_raise_a_bad_task_on_one_ddp_rank_stops_every_rank(tmp_path):
    """Before: rank 0 raised alone at its bad task; rank 1, waiting in the all-reduce, died of gloo's "Connection
    closed by peer" (NCCL waits for its timeout instead), an error that points away from the cause."""
    script = tmp_path / "ddp_skip.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(script), str(tmp_path), "raise"], env=env, cwd=tmp_path, timeout=240,
                         capture_output=True, text=True)
    assert run.returncode != 0 and not list(tmp_path.glob("rank*.pt"))
    assert "task 0 of this meta-batch has a non-finite inner loss" in run.stderr  # rank 0 names its task
    assert "a task on another DDP rank has a non-finite inner loss" in run.stderr  # rank 1 stops too


# ---------------------------------------------------------------- B. MPC settings checked at construction

DYNAMICS = {
    "grbal": lambda mpc: GrBAL(MLP(1, 2, (8,)), obs_dim=2, action_dim=1, exclude_obs_dims=[0, 1], mpc=mpc),
    "rebal": lambda mpc: ReBAL(obs_dim=2, action_dim=1, exclude_obs_dims=[0, 1], mpc=mpc),
    "mbmpc": lambda mpc: MBMPC(MLP(1, 2, (8,)), obs_dim=2, action_dim=1, exclude_obs_dims=[0, 1], mpc=mpc),
    "implicit_grbal": lambda mpc: ImplicitGrBAL(MLP(1, 2, (8,)), obs_dim=2, action_dim=1, exclude_obs_dims=[0, 1],
                                                mpc=mpc),
}

WHERE = r".*model\.init_args\.mpc"
BAD_MPC = {
    "negative_horizon": ({"horizon": -1}, r"horizon=-1: must be an int >= 1" + WHERE),
    "zero_candidates": ({"n_candidates": 0}, r"n_candidates=0: must be an int >= 1" + WHERE),
    "float_candidates": ({"n_candidates": 500.5}, r"n_candidates=500.5: must be an int >= 1" + WHERE),
    "misspelt_n_candidates": ({"n_candidate": 500}, r"'n_candidate' \(= 500\).*n_candidates.*did you mean "
                                                    r"'n_candidates'" + WHERE),
    "misspelt_horizon": ({"horizn": 10}, r"'horizn' \(= 10\).*horizon.*did you mean 'horizon'" + WHERE),
    "past_window": ({"past_window": 8}, r"'past_window' \(= 8\).*data\.init_args\.past_window" + WHERE),
    "unknown_planner": ({"planner": "cmaes"},
                        r"planner='cmaes' is not one of \('random_shooting', 'cem', 'mppi'\)" + WHERE),
    "misspelt_planner_kwarg": ({"planner": "cem", "planner_kwargs": {"n_elite": 5}},
                               r"planner_kwargs 'n_elite' \(= 5\) is not an argument of the cem planner.*n_elites.*"
                               r"did you mean 'n_elites'" + WHERE),
    "kwarg_of_another_planner": ({"planner_kwargs": {"temperature": 1.0}},
                                 r"planner_kwargs 'temperature' \(= 1.0\) is not an argument of the random_shooting "
                                 r"planner" + WHERE),
    "per_call_planner_kwarg": ({"planner_kwargs": {"horizon": 5}},
                               r"planner_kwargs 'horizon' \(= 5\).*set by the controller.*mpc.horizon" + WHERE),
    "mppi_temperature": ({"planner": "mppi", "planner_kwargs": {"temperature": 0.0}},
                         r"temperature=0.0: must be a finite number > 0" + WHERE),
    "cem_iterations": ({"planner": "cem", "planner_kwargs": {"iterations": 0}},
                       r"iterations=0: must be an int >= 1" + WHERE),
    "cem_alpha": ({"planner": "cem", "planner_kwargs": {"alpha": 1.0}}, r"alpha=1.0: .*\[0, 1\)" + WHERE),
    "cem_default_elites_above_candidates": ({"planner": "cem", "n_candidates": 20},
                                           r"n_elites=50 > n_candidates=20" + WHERE),
    "action_noise_in_mpc": ({"action_noise": 0.1},
                            r"'action_noise' \(= 0.1\).*data\.init_args\.action_noise.*collection rounds" + WHERE),
    "negative_seed": ({"seed": -1}, r"seed=-1: must be an int >= 0" + WHERE),
    "adapt_not_bool": ({"adapt": "no"}, r"adapt='no': must be True or False" + WHERE),
    "planner_kwargs_not_a_dict": ({"planner_kwargs": ["iterations", 3]}, r"planner_kwargs=\[.*must be a dict" + WHERE),
    "mpc_not_a_dict": (["cem"], r"mpc=\['cem'\]: must be a dict" + WHERE),
}


@pytest.mark.parametrize("case", BAD_MPC)
@pytest.mark.parametrize("learner", DYNAMICS)
def test_bad_mpc_settings_fail_at_construction(learner, case):
    """Before: every one of these learners was built without complaint (the error came, if at all, after the
    random rollouts and a whole epoch, when the first round of MPC rollouts began)."""
    mpc, message = BAD_MPC[case]
    with pytest.raises(ValueError, match=message):
        DYNAMICS[learner](mpc)


@pytest.mark.parametrize("mpc", [
    None, {}, {"planner": "random_shooting", "horizon": 10, "n_candidates": 500},
    {"planner": "cem", "horizon": 3, "n_candidates": 32, "planner_kwargs": {"iterations": 2, "n_elites": 4}},
    {"planner": "mppi", "planner_kwargs": {"temperature": 0.5, "noise_std": 0.3, "iterations": 2}},
    {"adapt": False, "seed": 3, "planner_kwargs": None},
], ids=["none", "empty", "paper", "cem", "mppi", "adapt_seed"])
@pytest.mark.parametrize("learner", DYNAMICS)
def test_good_mpc_settings_are_kept(learner, mpc):
    assert DYNAMICS[learner](mpc).mpc == dict(mpc or {})


def test_mpc_controller_checks_its_settings_when_built():
    """evaluate() and the callbacks build an MPCController directly: bad settings fail before the first step.
    Before: horizon=0 was accepted and failed in the first call."""
    model = DYNAMICS["grbal"](None)
    reward_fn = lambda obs, action, next_obs: -next_obs[..., 0].abs()  # noqa: E731
    with pytest.raises(ValueError, match=r"horizon=0: must be an int >= 1.*MPCController"):
        MPCController(model, reward_fn, None, np.array([-1.0]), np.array([1.0]), horizon=0)
    with pytest.raises(ValueError, match=r"'iteration' \(= 2\).*did you mean 'iterations'"):
        MPCController(model, reward_fn, None, np.array([-1.0]), np.array([1.0]), planner="mppi",
                      planner_kwargs={"iteration": 2})
    controller = MPCController(model, reward_fn, None, np.array([-1.0]), np.array([1.0]), horizon=2, n_candidates=8)
    assert controller(np.zeros((1, 2), dtype=np.float32)).shape == (1, 1)
