"""Every benchmark script runs from a fresh install at its smoke size (the figures mean nothing here: only that the
script works end to end, prints its machine line and writes its plot outside docs/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def smoke_args(tmp: Path) -> dict[str, list[str]]:
    plot = ["--plot", str(tmp / "plot.png")]
    return {
        "adaptation_strength": ["--quick", *plot],
        "accuracy_budget": ["--quick", "--methods", "iMAML-GD", "MAML", "fine-tune", "--curve-every", "5",
                            "--curve-episodes", "20", "--save-dir", str(tmp / "runs"), *plot],
        "callback_overhead": ["--quick"],
        "cg_fidelity": ["--quick", *plot],
        "env_steps": ["--quick", "--seconds", "0.05", *plot],
        "gait": ["--quick"],
        "gpu_check": ["--device", "cpu", "--quick"],
        "integrity_cost": ["--quick"],
        "kernels": ["--quick", *plot],
        "memory_vs_inner_steps": ["--steps", "2,3", "--maml-max-steps", "2", "--chunks", "2,8", "--chunk-steps", "2",
                                  *plot],
        "meta_throughput": ["--quick", "--phases", *plot],
        "model_quality": ["--quick"],
        "planning": ["--quick", *plot],
        "rl_returns": ["--quick", "--methods", "grbal", "mbmpc", "true", "random", "--plot", str(tmp / "plot.png")],
        "scaling": ["--quick", *plot],
        "state_sensitivity": ["--quick", *plot],
        "soak_ddp": ["--minutes", "0.4", "--sample-s", "8", "--warmup-min", "0.1", "--compare-steps", "5",
                     "--out", str(tmp / "soak"), *plot],
        "task_assembly": [*plot],
        "task_change": ["--quick", *plot],
        "window_sampling": ["--quick", "--sizes", "10000"],
    }


def test_every_script_has_a_smoke_run(tmp_path):
    scripts = {p.stem for p in (REPO / "benchmarks").glob("*.py")} - {"common"}
    assert scripts == set(smoke_args(tmp_path)), "add the new benchmark's smoke arguments here"


@pytest.mark.parametrize("script", sorted(smoke_args(Path("/tmp"))))
def test_benchmark_runs(script, tmp_path):
    docs = {p.name: p.stat().st_mtime_ns for p in (REPO / "docs").glob("*.png")}
    env = {**os.environ, "WANDB_MODE": "offline", "MPLBACKEND": "Agg"}
    run = subprocess.run([sys.executable, f"benchmarks/{script}.py", *smoke_args(tmp_path)[script]], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert " cores | python " in run.stdout  # the machine line beside the figures
    assert {p.name: p.stat().st_mtime_ns for p in (REPO / "docs").glob("*.png")} == docs, "a smoke run wrote docs/"


def test_rl_returns_evaluates_kept_checkpoints_with_other_planner_settings(tmp_path):
    """``--keep`` then ``--checkpoints``: the kept learner, evaluated again without training, returns what it
    returned right after training (same seed, same planner), keeps its training time, and ``--mpc`` changes the
    planner of every arm."""
    import json

    env = {**os.environ, "WANDB_MODE": "offline", "MPLBACKEND": "Agg"}

    def bench(*args) -> dict:
        out = tmp_path / f"run{len(list(tmp_path.glob('run*.json')))}.json"
        run = subprocess.run([sys.executable, "benchmarks/rl_returns.py", "--quick", "--episodes", "1", "--plot",
                              str(tmp_path / "plot.png"), "--json", str(out), *args], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
        return json.loads(out.read_text())["halfcheetah_crippled"]

    trained = bench("--methods", "mbmpc", "--keep", str(tmp_path / "keep"))["mbmpc"]
    assert len(trained["no_adapt"]["tasks"]) == 1  # the episode's task, for the by-task table
    sidecar = tmp_path / "keep" / "mbmpc_halfcheetah_crippled.json"
    kept = json.loads(sidecar.read_text())
    assert (kept["train_s"], kept["train_env_steps"]) == (trained["train_s"], trained["train_env_steps"])
    sidecar.write_text(json.dumps({**kept, "curve": [[100.0, 1.5, 0.5]]}))  # as a --monitors run writes it
    again = bench("--methods", "mbmpc", "--checkpoints", str(tmp_path / "keep"))["mbmpc"]
    assert again["no_adapt"]["returns"] == trained["no_adapt"]["returns"]
    assert (again["train_s"], again["train_env_steps"]) == (trained["train_s"], trained["train_env_steps"])
    mppi = bench("--methods", "mbmpc", "true", "--checkpoints", str(tmp_path / "keep"), "--mpc",
                 '{"planner": "mppi", "planner_kwargs": {"iterations": 2}}')
    for arm in ("mbmpc", "true"):
        assert mppi[arm]["mpc"]["planner"] == "mppi" and mppi[arm]["mpc"]["planner_kwargs"] == {"iterations": 2}
    assert mppi["mbmpc"]["no_adapt"]["returns"] != trained["no_adapt"]["returns"]
    assert again["curve"] == [[100.0, 1.5, 0.5]] and mppi["mbmpc"]["curve"] == []  # a curve is its planner's
    fresh = bench("--methods", "mbmpc", "--checkpoints", str(tmp_path / "keep"), "--eval-seed", "4321")["mbmpc"]
    assert (fresh["eval_seed"], again["eval_seed"]) == (4321, 1234)  # other episodes, the same model
    assert fresh["no_adapt"]["returns"] != again["no_adapt"]["returns"]
    # --load pools a method found in several files (training seeds): a row per file, then the pooled row
    pooled = subprocess.run([sys.executable, "benchmarks/rl_returns.py", "--load", str(tmp_path / "run0.json"),
                             str(tmp_path / "run1.json"), "--plot", str(tmp_path / "pooled.png")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert pooled.returncode == 0, (pooled.stdout + pooled.stderr)[-4000:]
    assert "  run0" in pooled.stdout and "  run1" in pooled.stdout and "mbmpc (2 runs)" in pooled.stdout
    assert (tmp_path / "pooled.png").is_file()
    mixed = subprocess.run([sys.executable, "benchmarks/rl_returns.py", "--load", str(tmp_path / "run0.json"),
                            str(tmp_path / "run2.json"), "--plot", str(tmp_path / "mixed.png")], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert mixed.returncode != 0 and "under different planner settings" in mixed.stderr
    bad = subprocess.run([sys.executable, "benchmarks/rl_returns.py", "--quick", "--methods", "grbal", "--checkpoints",
                          str(tmp_path / "keep")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "no grbal_halfcheetah_crippled.ckpt there" in bad.stderr
    bad = subprocess.run([sys.executable, "benchmarks/rl_returns.py", "--mpc", "[1]"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "must be a JSON object of MPCController arguments" in bad.stderr
    # a misspelt planner setting fails before any training, naming the key and the fix
    bad = subprocess.run([sys.executable, "benchmarks/rl_returns.py", "--methods", "mbmpc", "--mpc",
                          '{"planner": "mppi", "planner_kwargs": {"iteratons": 3}}'], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "'iteratons' (= 3) is not an argument of the mppi planner" in bad.stderr
    assert "did you mean 'iterations'?" in bad.stderr and "fix it in --mpc" in bad.stderr


def test_rl_returns_pools_runs_across_training_seeds():
    """Several runs of one method: the mean of their means, with Student's t CI across runs (closed form here)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from rl_returns import pool_runs, print_by_task, variant

    def run(mean: float, mpc: dict | None = None) -> dict:
        arm = {"returns": [mean - 1, mean + 1], "mean_return": mean, "ci95": 1.0, "pred_error_pre": 0.1,
               "pred_error_post": 0.1, "eval_s": 2.0, "planner_ms_per_step": 5.0}
        return {"train_env_steps": 100, "train_s": 10.0, "mpc": mpc or {"planner": "mppi"}, "no_adapt": arm}

    one = run(7.0)
    assert pool_runs([("a", one)]) is one
    pooled = pool_runs([("s0", run(100.0)), ("s1", run(150.0)), ("s2", run(200.0))])
    # mean 150, sample sd 50, t(0.975, 2 dof) = 4.302653
    assert pooled["no_adapt"]["mean_return"] == pytest.approx(150.0)
    assert pooled["no_adapt"]["ci95"] == pytest.approx(4.302653 * 50 / 3 ** 0.5, rel=1e-5)
    assert pooled["no_adapt"]["returns"] == [100.0, 150.0, 200.0] and [r[0] for r in pooled["runs"]] == ["s0", "s1", "s2"]
    # runs pool under one row only when their --set overrides differ in the training seed alone
    assert variant({"overrides": ["--seed_everything", "2", "--data.init_args.action_noise", "0.3"]}) == \
        " [action_noise=0.3]"
    assert variant({"overrides": ["--seed_everything=3"]}) == variant({}) == ""
    assert variant({"overrides": ["--trainer.max_epochs=4", "--model.init_args.mpc", '{"horizon": 5}']}) == \
        ' [max_epochs=4, mpc={"horizon": 5}]'
    with pytest.raises(SystemExit, match="different planner settings"):
        pool_runs([("s0", run(1.0)), ("s1", run(2.0, {"planner": "cem"}))])


def test_rl_returns_splits_returns_by_task(capsys):
    """The by-task table: each task's episodes' mean return +- 1.96 standard errors, and their count."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from rl_returns import print_by_task

    arm = {"returns": [10.0, 20.0, 300.0, 30.0], "tasks": [[0, 1], [0, 1], [1, 0], [0, 1]]}
    every_episode_its_own = {**arm, "tasks": [[0.1, 1], [0.2, 1], [0.3, 1], [0.4, 1]]}  # sampled tasks (the pier)
    print_by_task({"env": {"grbal": {"adapt": arm}, "true": {"no_adapt": {**arm, "tasks": [[0, 1]] * 4}},
                           "mbmpc": {"no_adapt": every_episode_its_own}}})
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.startswith("env ") and "method" not in line]
    assert len(rows) == 2  # one task only (true), or one per episode (mbmpc): nothing to group
    assert rows[0][3:] == ["[0,1]", "20.0", "+-", "11.3", "3"]  # 1.96 * 10 / sqrt(3) = 11.3
    assert rows[1][3:] == ["[1,0]", "300.0", "+-", "0.0", "1"]


def test_gait_figures_and_the_planner_controls(tmp_path):
    """Gait figures against hand-made episodes; the upright objective in closed form; pinned joints never move."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch
    from gait import gait, upright_objective

    obs = torch.zeros(4, 18)
    obs[:, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    next_obs = obs.clone()
    next_obs[:, 0] += 1.0
    next_obs[:, 2] = torch.tensor([0.5, 2.0, 3.1, -4.0])  # cos < 0 from the second step on
    assert gait(obs, next_obs, dt=0.05) == {"speed": pytest.approx(4.0 / (4 * 0.05)), "upside_down": 0.75,
                                            "first_flip": 1}
    next_obs[:, 2] = 0.2
    assert gait(obs, next_obs, dt=0.05)["first_flip"] == -1
    base = lambda o, a, n: torch.ones(n.shape[:-1])  # noqa: E731
    pitch = torch.zeros(3, 18)
    pitch[:, 2] = torch.tensor([0.5, 1.5, -3.0])
    assert upright_objective(base, 10.0)(pitch, None, pitch).tolist() == pytest.approx([1.0, -4.0, -19.0])

    out = tmp_path / "gait.json"
    run = subprocess.run([sys.executable, "benchmarks/gait.py", "--quick", "--pin", "bshin", "fthigh", "--upright", "5",
                          "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    (result,) = json.loads(out.read_text())
    (episode,) = result["episodes"]
    assert episode["task"] in ("bshin", "fshin") and result["pin"] == ["bshin", "fthigh"]
    # MB-MPC does not adapt: the same K-step error before and after
    assert result["pred_error_pre"] > 0.0 and result["pred_error_post"] == result["pred_error_pre"]
    assert episode["action_rms"]["bshin"] == episode["action_rms"]["fthigh"] == 0.0
    assert episode["action_rms"]["bthigh"] > 0.0


def test_gait_of_the_training_data_per_collection_round(tmp_path):
    """--training-data: per round (2 random rollouts, then rounds of 1) the speed and pitch of hand-made rollouts
    stored the way a checkpoint stores them."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch
    from gait import training_data
    from lit_meta.rl.buffer import Rollout, RolloutBuffer

    buffer, steps = RolloutBuffer(window=4), 10
    for k, (speed, pitch, joint) in enumerate([(0.0, 0.0, 0), (1.0, 0.0, 3), (2.0, 3.2, 1), (3.0, -0.1, 5)]):
        obs = torch.zeros(steps, 18)
        obs[:, 0] = speed * 0.05 * torch.arange(steps)
        next_obs = obs.clone()
        next_obs[:, 0] += speed * 0.05
        next_obs[:, 2] = pitch
        task = torch.zeros(steps, 6)
        task[:, joint] = 1.0
        buffer.add([Rollout(obs, torch.zeros(steps, 6), next_obs, torch.zeros(steps), torch.zeros(steps, dtype=torch.bool),
                            task, seed=k)])
    path = tmp_path / "mbmpc.ckpt"
    torch.save({"RolloutDataModule": {"buffer": buffer.state_dict()}, "lit_meta_run": {"config": {"data": {"init_args": {
        "initial_rollouts": 2, "rollouts_per_round": 1, "env_id": "lit_meta/HalfCheetahCrippledJoint-v0"}}}}}, path)
    rounds = training_data(str(path))
    assert [r["round"] for r in rounds] == [0, 1, 2] and [r["rollouts"] for r in rounds] == [2, 1, 1]
    assert [r["tasks"] for r in rounds] == [["bthigh", "fthigh"], ["bshin"], ["ffoot"]]
    assert [r["speed"] for r in rounds] == pytest.approx([0.5, 2.0, 3.0])
    assert [r["max_speed"] for r in rounds] == pytest.approx([1.0, 2.0, 3.0])
    assert [r["upside_down"] for r in rounds] == [0.0, 1.0, 0.0]
    torch.save({"state_dict": {}}, tmp_path / "bare.ckpt")
    with pytest.raises(SystemExit, match="no stored rollouts"):
        training_data(str(tmp_path / "bare.ckpt"))


def test_gait_refuses_bad_planner_settings_before_any_episode():
    for mpc, message in [('{"horizn": 5}', "did you mean 'horizon'"), ('{"seed": 3}', "with --seed"), ("x", "not JSON")]:
        run = subprocess.run([sys.executable, "benchmarks/gait.py", "--quick", "--mpc", mpc], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]
