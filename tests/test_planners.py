"""lit_meta.rl.planners: known optima, brute force, torchrl parity, non-finite models, batching, bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from lit_meta.rl.planners import (PlanResult, action_bounds, cem, mppi, random_shooting, shift_plan,
                                  torchrl_model_env, torchrl_return_to_go)

PLANNERS = {
    "random_shooting": (random_shooting, {"n_candidates": 2000}),
    "cem": (cem, {"n_candidates": 200, "n_elites": 20, "iterations": 5}),
    "mppi": (mppi, {"n_candidates": 500, "iterations": 4, "temperature": 0.01, "noise_std": 0.3}),
}


def gen(seed: int = 0, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def integrator(x, a):
    """x' = x + a (1-D, or elementwise)."""
    return x + a


@torch.no_grad()
def manual_return(dynamics, reward_fn, obs, plan, termination_fn=None) -> float:
    """The model return of one action sequence ``plan[H, A]`` from ``obs[D]``, step by step."""
    x, total, alive = obs[None], 0.0, True
    for a in plan.detach():
        nxt = dynamics(x, a[None])
        if alive:
            total += float(reward_fn(x, a[None], nxt)[0])
            if termination_fn is not None and bool(termination_fn(x, a[None], nxt)[0]):
                alive = False
        x = nxt
    return total


# ------------------------------------------------------------------------------------------------ optimum


@pytest.mark.parametrize("name", PLANNERS)
def test_first_action_is_the_known_optimum_for_each_env(name):
    # x' = x + a, r = -(x' - 0.3)^2, a in [-1, 1]: the best first action is 0.3 - x (then 0).
    planner, kw = PLANNERS[name]
    obs = torch.tensor([[0.0], [0.5], [-0.5]])
    reward = lambda x, a, n: -(n[..., 0] - 0.3).square()  # noqa: E731
    res = planner(integrator, reward, obs, horizon=2, action_low=[-1.0], action_high=[1.0], generator=gen(), **kw)
    assert isinstance(res, PlanResult)
    assert res.action.shape == (3, 1) and res.plan.shape == (3, 2, 1) and res.expected_return.shape == (3,)
    torch.testing.assert_close(res.action[:, 0], torch.tensor([0.3, -0.2, 0.8]), atol=0.06, rtol=0)
    assert (res.n_nonfinite == 0).all() and not res.fallback.any()
    assert (res.expected_return <= 0).all() and (res.expected_return > -0.01).all()


@pytest.mark.parametrize("name", PLANNERS)
def test_termination_changes_the_optimum(name):
    # r = x', episode terminates when x' > 0.5 (the terminating step's reward counts, later ones 0).
    # Horizon 3 from x=0: without termination a = 1, 1, 1 (return 6); with it, x1 = x2 = 0.5 then jump:
    # a1 = 0.5 (a boundary optimum), return 0.5 + 0.5 + 1.5 = 2.5.
    planner, kw = PLANNERS[name]
    reward = lambda x, a, n: n[..., 0]  # noqa: E731
    term = lambda x, a, n: n[..., 0] > 0.5  # noqa: E731
    obs = torch.zeros(1, 1)
    kw = {**kw, "temperature": 0.002} if name == "mppi" else kw
    free = planner(integrator, reward, obs, horizon=3, action_low=[-1.0], action_high=[1.0], generator=gen(), **kw)
    assert free.action.item() > 0.9 and free.expected_return.item() > 5.5
    res = planner(integrator, reward, obs, horizon=3, action_low=[-1.0], action_high=[1.0], generator=gen(),
                  termination_fn=term, **kw)
    assert 0.3 < res.action.item() <= 0.5 + 1e-6
    # random shooting rarely samples the (a1, a2) = (0.5, 0) corner; x1 = 0.5, x2 = 1.5 gives 2.0
    assert (1.9 if name == "random_shooting" else 2.2) < res.expected_return.item() <= 2.5 + 1e-5
    if name != "mppi":  # MPPI's expected_return is a weighted mean over candidates, not the plan's return
        assert res.expected_return.item() == pytest.approx(
            manual_return(integrator, reward, obs[0], res.plan[0], term), abs=1e-5)


def test_expected_return_is_the_plans_model_return():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    dyn = lambda x, a: x + 0.1 * model(torch.cat([x, a], -1))  # noqa: E731
    reward = lambda x, a, n: -n.square().sum(-1) - 0.1 * a.square().sum(-1)  # noqa: E731
    obs = torch.randn(2, 3)
    for planner in (random_shooting, cem):
        res = planner(dyn, reward, obs, horizon=4, n_candidates=64, action_low=[-1, -1], action_high=[1, 1],
                      generator=gen(1), **({"n_elites": 8} if planner is cem else {}))
        for e in range(2):
            assert res.expected_return[e].item() == pytest.approx(
                manual_return(dyn, reward, obs[e], res.plan[e]), rel=1e-5, abs=1e-5)


# ------------------------------------------------------------------------------------------------ brute force


def brute_force(dynamics, reward_fn, obs, horizon, grid):
    """Exhaustive maximum of the return over ``grid ** horizon`` 1-D action sequences."""
    seqs = torch.tensor(list(itertools.product(grid.tolist(), repeat=horizon)))[..., None]  # [G^H, H, 1]
    x, ret = obs.expand(len(seqs), -1), torch.zeros(len(seqs))
    for t in range(horizon):
        nxt = dynamics(x, seqs[:, t])
        ret += reward_fn(x, seqs[:, t], nxt)
        x = nxt
    best = ret.argmax()
    return ret[best].item(), seqs[best]


@pytest.mark.parametrize("name", PLANNERS)
def test_agrees_with_brute_force_on_a_small_nonlinear_problem(name):
    # A pendulum-like 2-D state, 1-D action, horizon 3: the exhaustive maximum over a 41-point grid per step.
    def dyn(x, a):
        th, om = x[..., 0], x[..., 1]
        om = om + 0.3 * (torch.sin(th) + a[..., 0])
        return torch.stack([th + 0.3 * om, om], -1)

    reward = lambda x, a, n: -(n[..., 0] - 0.8).square() - 0.05 * a[..., 0].square()  # noqa: E731
    obs = torch.tensor([[0.1, 0.0]])
    best, best_seq = brute_force(dyn, reward, obs, 3, torch.linspace(-1, 1, 41))
    planner, kw = PLANNERS[name]
    res = planner(dyn, reward, obs, horizon=3, action_low=[-1.0], action_high=[1.0], generator=gen(3), **kw)
    achieved = manual_return(dyn, reward, obs[0], res.plan[0])
    # the continuous optimum can be a hair above the grid's; sampling gets within a small gap of it
    assert best - 0.02 < achieved < best + 0.01, (achieved, best)
    assert abs(res.action.item() - best_seq[0].item()) < 0.2


def test_random_shooting_equals_brute_force_over_its_own_candidates():
    # the chosen plan is the argmax of the candidates' returns: redraw the documented candidates and check
    reward = lambda x, a, n: -(n[..., 0] - 0.3).square() + 0.5 * torch.sin(5 * a[..., 0])  # noqa: E731
    obs = torch.tensor([[0.2]])
    res = random_shooting(integrator, reward, obs, horizon=2, n_candidates=50, action_low=[-1.0], action_high=[1.0],
                          generator=gen(7))
    cand = torch.rand(50, 2, 1, generator=gen(7)) * 2 - 1
    rets = torch.tensor([manual_return(integrator, reward, obs[0], c) for c in cand])
    assert res.expected_return.item() == pytest.approx(rets.max().item(), abs=1e-5)
    torch.testing.assert_close(res.plan[0], cand[rets.argmax()])


# ------------------------------------------------------------------------------------------------ torchrl parity


def point_mass(x, a):
    """2-D point mass, dt 0.1: x = [px, py, vx, vy], a = force in [-1, 1]^2."""
    vel = x[..., 2:] + 0.1 * a
    return torch.cat([x[..., :2] + 0.1 * vel, vel], -1)


def point_mass_reward(x, a, n):
    return -(n[..., :2] - torch.tensor([1.0, -0.5])).square().sum(-1) - 0.01 * a.square().sum(-1)


def closed_loop(act, obs, steps):
    """Run MPC on the (exact) model; returns the episode return of each start state."""
    total = torch.zeros(len(obs))
    for _ in range(steps):
        a = act(obs)
        nxt = point_mass(obs, a)
        total += point_mass_reward(obs, a, nxt)
        obs = nxt
    return total


@pytest.mark.parametrize("method", ["cem", "mppi"])
def test_same_returns_as_torchrl_planners(method):
    from tensordict import TensorDict
    from torchrl.modules import CEMPlanner, MPPIPlanner

    H, N, K, iters, steps = 8, 100, 10, 4, 15
    start = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 0.5, -0.2, 0.1], [-0.5, 0.0, 0.3, 0.0]])
    low, high = -torch.ones(2), torch.ones(2)
    env = torchrl_model_env(point_mass, point_mass_reward, 4, low, high)
    if method == "cem":
        theirs = CEMPlanner(env, H, iters, N, K)
    else:
        # torchrl weights exp(temperature * return) without subtracting the max: keep exp() in float32 range
        theirs = MPPIPlanner(env, torchrl_return_to_go(), 1.0, H, iters, N, K)
    torch.manual_seed(0)
    ref = closed_loop(lambda o: theirs(TensorDict({"observation": o}, [len(o)]))["action"], start, steps)

    g, state = gen(0), {"warm": None}

    def ours(o):
        if method == "cem":
            res = cem(point_mass, point_mass_reward, o, horizon=H, n_candidates=N, n_elites=K, iterations=iters,
                      action_low=low, action_high=high, init_mean=state["warm"], generator=g)
        else:
            res = mppi(point_mass, point_mass_reward, o, horizon=H, n_candidates=N, iterations=iters,
                       temperature=0.05, noise_std=0.5, action_low=low, action_high=high, init_mean=state["warm"],
                       generator=g)
        state["warm"] = shift_plan(res.plan, low, high)
        return res.action

    mine = closed_loop(ours, start, steps)
    do_nothing = closed_loop(lambda o: torch.zeros(len(o), 2), start, steps)
    assert (ref > do_nothing + 1).all() and (mine > do_nothing + 1).all()  # both actually control
    # same returns within noise (5% of the gap to doing nothing), ours never clearly worse
    tol = 0.05 * (ref - do_nothing).abs()
    assert (mine >= ref - tol).all(), (mine, ref)


# ------------------------------------------------------------------------------------------------ non-finite


@pytest.mark.parametrize("name", PLANNERS)
def test_nonfinite_candidates_are_never_chosen_and_counted(name):
    # the optimum (a = 0.8) lies where the model blows up (a > 0.5): the planners must stay below 0.5
    planner, kw = PLANNERS[name]

    def dyn(x, a):
        return torch.where(a > 0.5, torch.nan, x + a)

    reward = lambda x, a, n: -(n[..., 0] - 0.8).square()  # noqa: E731
    res = planner(dyn, reward, torch.zeros(2, 1), horizon=1, action_low=[-1.0], action_high=[1.0], generator=gen(),
                  **kw)
    assert (res.action <= 0.5).all() and (res.action > 0.4).all()
    assert torch.isfinite(res.expected_return).all() and torch.isfinite(res.plan).all()
    assert (res.n_nonfinite > 0).all() and not res.fallback.any()
    if name == "random_shooting":  # exact count: the documented candidate draw, env by env
        g = gen()
        for e in range(2):
            cand = torch.rand(kw["n_candidates"], 1, 1, generator=g) * 2 - 1
            assert res.n_nonfinite[e].item() == int((cand > 0.5).sum())


def test_nonfinite_state_coordinate_unused_by_the_reward_still_discards():
    def dyn(x, a):
        nxt = x + a
        return torch.stack([nxt[..., 0], torch.where(a[..., 0] < 0, torch.inf, 0.0)], -1)

    reward = lambda x, a, n: -(n[..., 0] + 0.5).square()  # noqa: E731  (optimum a = -0.5, where dim 1 is inf)
    res = random_shooting(dyn, reward, torch.zeros(1, 2), horizon=1, n_candidates=100, action_low=[-1.0],
                          action_high=[1.0], generator=gen())
    assert res.action.item() >= 0 and 20 < res.n_nonfinite.item() < 80


def test_inf_reward_is_discarded_and_nan_after_termination_is_not():
    reward = lambda x, a, n: torch.where(a[..., 0] > 0.9, torch.inf, -a[..., 0].abs())  # noqa: E731
    res = random_shooting(integrator, reward, torch.zeros(1, 1), horizon=1, n_candidates=200, action_low=[-1.0],
                          action_high=[1.0], generator=gen())
    assert res.action.item() <= 0.9 and res.n_nonfinite.item() > 0

    # terminated at step 1 (x' > 0), the model returns NaN afterwards: those candidates are kept
    dyn = lambda x, a: torch.where(x > 0, torch.nan, x + a)  # noqa: E731
    reward = lambda x, a, n: torch.nan_to_num(n[..., 0], nan=0.0)  # noqa: E731
    res = random_shooting(dyn, reward, torch.zeros(1, 1), horizon=3, n_candidates=200, action_low=[-1.0],
                          action_high=[1.0], generator=gen(), termination_fn=lambda x, a, n: ~(n[..., 0] <= 0))
    assert res.n_nonfinite.item() == 0 and res.action.item() > 0.9 and not res.fallback.any()


@pytest.mark.parametrize("name", PLANNERS)
def test_all_nonfinite_returns_a_safe_finite_action(name):
    planner, kw = PLANNERS[name]
    dyn = lambda x, a: torch.full_like(x, torch.nan)  # noqa: E731
    res = planner(dyn, lambda x, a, n: n[..., 0], torch.zeros(2, 3), horizon=4, action_low=[0.2, -1.0],
                  action_high=[1.0, 1.0], generator=gen(), **kw)
    torch.testing.assert_close(res.action, torch.tensor([[0.2, 0.0], [0.2, 0.0]]))  # zeros clipped to the bounds
    assert res.fallback.all() and torch.isfinite(res.plan).all()
    assert (res.expected_return == -math.inf).all()
    assert (res.n_nonfinite == kw["n_candidates"] * kw.get("iterations", 1)).all()


def test_only_the_broken_env_falls_back():
    # env 0's state makes the model NaN, env 1 plans normally
    dyn = lambda x, a: torch.where(x[..., :1] > 5, torch.nan, x + a)  # noqa: E731
    reward = lambda x, a, n: -(n[..., 0] - 0.3).square()  # noqa: E731
    res = cem(dyn, reward, torch.tensor([[10.0], [0.0]]), horizon=2, n_candidates=100, n_elites=10,
              action_low=[-1.0], action_high=[1.0], generator=gen())
    assert res.fallback.tolist() == [True, False]
    assert res.action[0].item() == 0.0 and abs(res.action[1].item() - 0.3) < 0.05
    assert res.n_nonfinite.tolist() == [500, 0]


# ------------------------------------------------------------------------------------------------ batching


def small_mlp_dynamics(obs_dim=4, act_dim=2, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(obs_dim + act_dim, 32), nn.ReLU(), nn.Linear(32, obs_dim))
    return lambda x, a: x + 0.1 * model(torch.cat([x, a], -1))


@pytest.mark.parametrize("name", PLANNERS)
def test_three_envs_at_once_equal_each_env_alone(name):
    planner, kw = PLANNERS[name]
    kw = {**kw, "n_candidates": 64} | ({"n_elites": 8} if name == "cem" else {})
    dyn = small_mlp_dynamics()
    reward = lambda x, a, n: -n.square().sum(-1) - 0.1 * a.square().sum(-1)  # noqa: E731
    obs = torch.randn(3, 4, generator=gen(5))
    warm = torch.rand(3, 5, 2, generator=gen(6)) - 0.5
    if name != "random_shooting":
        kw["init_mean"] = warm
    bounds = dict(action_low=[-1.0, -1.0], action_high=[1.0, 1.0])
    calls = []

    def counting(x, a):
        calls.append(x.shape[0])
        return dyn(x, a)

    together = planner(counting, reward, obs, horizon=5, generator=gen(9), **bounds, **kw)
    n_iter = kw.get("iterations", 1)
    assert calls == [3 * kw["n_candidates"]] * (5 * n_iter)  # one model call per step, all envs together
    g = gen(9)
    for e in range(3):
        kw_e = {**kw, "init_mean": warm[e]} if "init_mean" in kw else kw
        alone = planner(dyn, reward, obs[e], horizon=5, generator=g, **bounds, **kw_e)  # unbatched obs
        assert alone.action.shape == (2,) and alone.plan.shape == (5, 2)
        torch.testing.assert_close(alone.plan, together.plan[e], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.expected_return, together.expected_return[e], atol=1e-4, rtol=1e-5)


def test_same_generator_state_same_plan_and_default_rng_works():
    dyn = small_mlp_dynamics()
    reward = lambda x, a, n: -n.square().sum(-1)  # noqa: E731
    obs = torch.randn(2, 4, generator=gen(1))
    a = mppi(dyn, reward, obs, horizon=3, n_candidates=32, action_low=-1.0, action_high=1.0, act_dim=2, generator=gen())
    b = mppi(dyn, reward, obs, horizon=3, n_candidates=32, action_low=-1.0, action_high=1.0, act_dim=2, generator=gen())
    assert torch.equal(a.plan, b.plan)
    c = cem(dyn, reward, obs, horizon=3, n_candidates=32, n_elites=4, action_low=-1.0, action_high=1.0, act_dim=2)
    assert c.action.shape == (2, 2)


# ------------------------------------------------------------------------------------------------ warm start


def test_shift_plan():
    plan = torch.tensor([[[0.1, 0.2], [0.3, 0.4], [0.5, 0.9]]])
    low, high = [-1.0, 0.0], [1.0, 0.5]
    torch.testing.assert_close(shift_plan(plan, low, high), torch.tensor([[[0.3, 0.4], [0.5, 0.5], [0.0, 0.25]]]))
    torch.testing.assert_close(shift_plan(plan[0], low, high, pad="last")[-1], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(shift_plan(plan, low, high, pad=0.1)[0, -1], torch.tensor([0.1, 0.1]))
    with pytest.raises(ValueError, match="pad="):
        shift_plan(plan, low, high, pad="zeros")


def test_cem_warm_start_converges_in_one_iteration():
    # started at the optimum with a small std, one iteration stays there
    reward = lambda x, a, n: -(n[..., 0] - 0.3).square()  # noqa: E731
    res = cem(integrator, reward, torch.zeros(1, 1), horizon=2, n_candidates=20, n_elites=5, iterations=1,
              action_low=[-1.0], action_high=[1.0], init_mean=torch.tensor([[0.3], [0.0]]), init_std=0.01,
              generator=gen(), return_mean_elites=True)
    assert abs(res.action.item() - 0.3) < 0.01 and res.expected_return.item() > -1e-3


# ------------------------------------------------------------------------------------------------ bad input


def _never_called(x, a):
    raise AssertionError("the planner did work before validating its arguments")


REWARD = lambda x, a, n: n[..., 0]  # noqa: E731
BOUNDS = dict(action_low=[-1.0], action_high=[1.0])


@pytest.mark.parametrize("call, match", [
    (lambda: random_shooting(_never_called, REWARD, torch.zeros(1, 1), horizon=0, **BOUNDS), r"horizon=0.*>= 1"),
    (lambda: cem(_never_called, REWARD, torch.zeros(1, 1), horizon=-3, **BOUNDS), r"horizon=-3"),
    (lambda: mppi(_never_called, REWARD, torch.zeros(1, 1), horizon=2.5, **BOUNDS), r"horizon=2.5"),
    (lambda: random_shooting(_never_called, REWARD, torch.zeros(1, 1), n_candidates=0, **BOUNDS),
     r"n_candidates=0.*at least one"),
    (lambda: cem(_never_called, REWARD, torch.zeros(1, 1), n_candidates=10, n_elites=11, **BOUNDS),
     r"n_elites=11 > n_candidates=10.*n_elites <= 10"),
    (lambda: cem(_never_called, REWARD, torch.zeros(1, 1), n_elites=0, **BOUNDS), r"n_elites=0"),
    (lambda: cem(_never_called, REWARD, torch.zeros(1, 1), alpha=1.0, **BOUNDS), r"alpha=1.0.*\[0, 1\)"),
    (lambda: cem(_never_called, REWARD, torch.zeros(1, 1), init_std=-1.0, **BOUNDS), r"init_std must be >= 0"),
    (lambda: cem(_never_called, REWARD, torch.zeros(1, 1), horizon=3, init_mean=torch.zeros(4, 1), **BOUNDS),
     r"init_mean has shape \(4, 1\).*horizon=3"),
    (lambda: mppi(_never_called, REWARD, torch.zeros(1, 1), temperature=0.0, **BOUNDS), r"temperature=0.0"),
    (lambda: mppi(_never_called, REWARD, torch.zeros(1, 1), noise_std=0.0, **BOUNDS), r"noise_std must be > 0"),
    (lambda: random_shooting(_never_called, REWARD, torch.zeros(1, 1), action_low=[1.0], action_high=[-1.0]),
     r"action_low > action_high at dims \[0\]"),
    (lambda: random_shooting(_never_called, REWARD, torch.zeros(1, 1), action_low=[-math.inf], action_high=[1.0]),
     r"must be finite"),
    (lambda: random_shooting(_never_called, REWARD, torch.zeros(1, 1), action_low=-1.0, action_high=1.0),
     r"act_dim"),
    (lambda: random_shooting(_never_called, REWARD, torch.zeros(1, 1), action_low=[-1.0, -1], action_high=[1.0]),
     r"disagree on the action size"),
    (lambda: random_shooting(_never_called, None, torch.zeros(1, 1), **BOUNDS), r"reward_fn.*env.unwrapped.reward_fn"),
    (lambda: random_shooting(_never_called, REWARD, torch.zeros(1, 2, 3), **BOUNDS), r"obs must be \[E, obs_dim\]"),
    (lambda: random_shooting(_never_called, REWARD, [[0.0]], **BOUNDS), r"obs must be a torch.Tensor"),
    (lambda: random_shooting(_never_called, REWARD, torch.zeros(1, 1, dtype=torch.long), **BOUNDS), r"floating"),
])
def test_bad_arguments_raise_before_any_work(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_wrong_model_and_reward_shapes_are_named():
    with pytest.raises(ValueError, match=r"dynamics\(obs\[8, 2\], action\[8, 1\]\) must return next_obs \[8, 2\]"):
        random_shooting(lambda x, a: x[:, :1], REWARD, torch.zeros(1, 2), n_candidates=8, **BOUNDS)
    with pytest.raises(ValueError, match=r"reward_fn.*must return Tensor\[8\]"):
        random_shooting(integrator, lambda x, a, n: n, torch.zeros(1, 2), n_candidates=8, action_low=[-1, -1],
                        action_high=[1, 1])


def test_action_bounds_accepts_numpy_and_scalars():
    np = pytest.importorskip("numpy")
    low, high = action_bounds(np.array([-1.0, -2.0], dtype=np.float32), 2.0)
    assert low.tolist() == [-1.0, -2.0] and high.tolist() == [2.0, 2.0] and low.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ devices, dtypes


def test_bf16_matmuls_keep_the_optimum():
    torch.manual_seed(0)
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1.0]]))
        lin.bias.zero_()
    dyn = lambda x, a: lin(torch.cat([x, a], -1))  # noqa: E731  x' = x + a through a matmul
    reward = lambda x, a, n: -(n[..., 0] - 0.3).square()  # noqa: E731
    res = cem(dyn, reward, torch.zeros(2, 1), horizon=2, n_candidates=100, n_elites=10, action_low=[-1.0],
              action_high=[1.0], generator=gen(), matmul_dtype=torch.bfloat16)
    assert res.plan.dtype == torch.float32 and res.expected_return.dtype == torch.float32
    torch.testing.assert_close(res.action, torch.full((2, 1), 0.3), atol=0.02, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", PLANNERS)
def test_runs_on_gpu(name):
    planner, kw = PLANNERS[name]
    obs = torch.tensor([[0.0], [0.5]], device="cuda")
    reward = lambda x, a, n: -(n[..., 0] - 0.3).square()  # noqa: E731
    res = planner(integrator, reward, obs, horizon=2, action_low=[-1.0], action_high=[1.0], generator=gen(0, "cuda"),
                  **kw)
    assert res.action.device.type == "cuda"
    torch.testing.assert_close(res.action[:, 0].cpu(), torch.tensor([0.3, -0.2]), atol=0.06, rtol=0)
    # a CPU generator drives a GPU plan: the noise is drawn on CPU and moved
    res_cpu_gen = planner(integrator, reward, obs, horizon=2, action_low=[-1.0], action_high=[1.0], generator=gen(),
                          **kw)
    assert res_cpu_gen.action.device.type == "cuda"
