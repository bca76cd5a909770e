"""Multi-node DDP on one machine: 2 nodes x 1 process on localhost (gloo, CPU), started as a cluster starts train.py.

Each node is launched the way the README's recipes launch it, with
``train.py fit ... --trainer.num_nodes 2 --trainer.devices 1 --trainer.accelerator cpu --trainer.strategy ddp``:

- torchrun: scripts/torchrun_multinode.sh on each node, which runs ``python -m torch.distributed.run --nnodes 2
  --nproc_per_node 1 --node_rank {0,1} --master_addr 127.0.0.1 --master_port PORT train.py ...``
  (Lightning's TorchElasticEnvironment);
- SLURM: the srun line of scripts/slurm_multinode.sbatch for ``--nodes 2 --ntasks-per-node 1``, simulated: each
  task is that ``python train.py ...`` started directly with the ``SLURM_*`` variables srun sets (Lightning's
  SLURMEnvironment), and a preemption SIGTERM goes to every task, as slurmstepd sends it.

Checked: the global meta-batch is split by global rank and the float64 parameters equal the 1-process run's;
a SIGTERM to every node, or to one node only, saves ``last.ckpt`` at the same step on both, every task exits 0, and ``--ckpt_path last`` (under the other launcher)
ends bitwise equal to the uninterrupted run; GrBAL's rollout aggregation gathers across nodes: both nodes end with
the replay buffer of the 1-process run. Every launch has a deadline: a hang fails the test, its logs attached.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
NODES = 2
DEADLINE_S = 240  # one launch (two nodes); they take 15-30 s on 2 cores


# ------------------------------------------------------------------------ callbacks the train.py processes load
# (class_path test_multinode.X: the children have tests/ on PYTHONPATH)

class RecordShares(Callback):
    """Each rank saves where it runs (node, ranks, world, cluster environment), its initial parameters and the
    support set of every meta-batch it receives."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_start(self, trainer, pl_module) -> None:
        r = trainer.global_rank
        env = getattr(trainer.strategy, "cluster_environment", None)
        (self.out / f"rank{r}.json").write_text(json.dumps({
            "node_rank": trainer.node_rank, "global_rank": r, "local_rank": trainer.local_rank,
            "world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
            "environment": type(env).__name__}))
        torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()}, self.out / f"rank{r}_initial.pt")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.save(batch[0].detach().clone(),
                   self.out / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}_step{batch_idx}.pt")


class SaveRollouts(Callback):
    """Each rank saves its RolloutDataModule state (replay buffers, round, statistics) at the end of training."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(trainer.datamodule.state_dict(), self.out / f"rollouts_rank{trainer.global_rank}.pt")


# ------------------------------------------------------------------------ launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """This environment without any SLURM_* variable (Lightning would take a surrounding SLURM job for ours)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               WANDB_MODE="offline", PYTHONWARNINGS="ignore")
    return env


MULTINODE = ["--trainer.num_nodes", str(NODES), "--trainer.devices", "1", "--trainer.accelerator", "cpu",
             "--trainer.strategy", "ddp"]


def launch(launcher: str, config: Path, logs: Path, *extra: str) -> list[subprocess.Popen]:
    """Start the 2 nodes of one run, each in its own session (so that a timeout can kill it whole).

    ``torchrun``: scripts/torchrun_multinode.sh on each node (static rendezvous at 127.0.0.1, NODE_RANK 0 and 1).
    ``slurm``: the srun line of scripts/slurm_multinode.sbatch (``--ckpt_path last`` included), one task per node
    started directly with the SLURM_* variables srun sets for ``--nodes 2 --ntasks-per-node 1``."""
    port, nodes = free_port(), []
    logs.mkdir(parents=True, exist_ok=True)
    for node in range(NODES):
        env = child_env()
        if launcher == "torchrun":
            env.update(NNODES=str(NODES), NPROC_PER_NODE="1", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), ACCELERATOR="cpu", PYTHON=sys.executable)
            cmd = ["bash", "scripts/torchrun_multinode.sh", str(config), *extra]
        else:
            env.update(SLURM_NTASKS=str(NODES), SLURM_NTASKS_PER_NODE="1", SLURM_NNODES=str(NODES),
                       SLURM_JOB_NUM_NODES=str(NODES), SLURM_PROCID=str(node), SLURM_NODEID=str(node),
                       SLURM_LOCALID="0", SLURM_JOB_ID="4242", SLURM_JOB_NAME="lit-meta-test",
                       SLURM_NODELIST="127.0.0.1", MASTER_PORT=str(port))
            cmd = [sys.executable, "train.py", "fit", "--config", str(config), *MULTINODE, "--ckpt_path", "last",
                   *extra]
        log_path = logs / f"{launcher}_node{node}.log"
        with open(log_path, "w") as log:
            nodes.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        nodes[-1].log_path = log_path
    return nodes


def kill_all(nodes: list[subprocess.Popen]) -> None:
    for p in nodes:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the node's own session: its launcher and worker
            except ProcessLookupError:
                pass
        p.wait()


def logs_of(nodes: list[subprocess.Popen]) -> str:
    return "\n".join(f"--- node {i}:\n{p.log_path.read_text()[-3000:]}" for i, p in enumerate(nodes))


def finish(nodes: list[subprocess.Popen], expect: int | None = 0) -> str:
    """Wait for every node (a deadline for all together), then check the exit statuses; returns the logs."""
    deadline = time.monotonic() + DEADLINE_S
    for p in nodes:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_all(nodes)
            pytest.fail(f"a node did not finish within {DEADLINE_S} s (hang?):\n{logs_of(nodes)}")
    out = logs_of(nodes)
    if expect is not None:
        assert [p.returncode for p in nodes] == [expect] * NODES, out
    return out


def run_nodes(launcher: str, config: Path, logs: Path, *extra: str) -> str:
    return finish(launch(launcher, config, logs, *extra))


def run_single(config: Path, *extra: str) -> subprocess.Popen:
    """The 1-process run of the same config (started, not waited for: it overlaps a 2-node run)."""
    return subprocess.Popen([sys.executable, "train.py", "fit", "--config", str(config), "--trainer.accelerator", "cpu",
                             *extra], cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_single(process: subprocess.Popen) -> None:
    try:
        out, _ = process.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        pytest.fail(f"the 1-process run did not finish within {DEADLINE_S} s:\n{out[-3000:]}")
    assert process.returncode == 0, out[-3000:]


def sinusoid_config() -> dict:
    """configs/imaml_sinusoid.yaml shrunk to seconds: MLP 16-16, 3 inner / CG steps, a global meta-batch of 8
    (4 tasks per rank on 2 nodes), 4 steps per epoch, 6 steps (so the run crosses an epoch boundary)."""
    config = yaml.safe_load((REPO / "configs" / "imaml_sinusoid.yaml").read_text())
    config["trainer"].update(max_steps=6, val_check_interval=None, check_val_every_n_epoch=1, limit_val_batches=0,
                             num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False)
    model = config["model"]["init_args"]
    model["net"]["init_args"]["hidden"] = [16, 16]
    model.update(inner_steps=3, cg_steps=3, lam=1.0, inner_lr=0.05)
    config["data"]["init_args"].update(k_shot=5, k_query=5, meta_batch_size=8, steps_per_epoch=4, eval_episodes=20,
                                       eval_meta_batch_size=20)
    return config


def final_state(tmp: Path, name: str) -> dict:
    from test_fault_tolerance import load

    return load(tmp / name / "final.ckpt")


def assert_close_float64(multi: dict, single: dict) -> None:
    for key, value in single.items():
        assert value.dtype == torch.float64 and multi[key].dtype == torch.float64, key
        assert torch.allclose(multi[key], value, rtol=1e-9, atol=1e-12), (key, (multi[key] - value).abs().max())


# ------------------------------------------------------------------------ the tests


def test_two_nodes_split_the_global_meta_batch_and_reach_the_1_process_parameters(tmp_path):
    from test_fault_tolerance import write_config

    from lit_meta.datamodules import SinusoidDataModule

    config = sinusoid_config()
    record = {"class_path": "test_multinode.RecordShares", "init_args": {"out": str(tmp_path)}}
    single = run_single(write_config(config, tmp_path, "single", 100, []), "--trainer.precision", "64")
    run_nodes("torchrun", write_config(config, tmp_path, "multi", 100, [record]), tmp_path / "logs",
              "--trainer.precision", "64")
    wait_single(single)

    where = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(NODES)]
    assert where == [{"node_rank": r, "global_rank": r, "local_rank": 0, "world_size": 2, "num_nodes": 2,
                      "environment": "TorchElasticEnvironment"} for r in range(NODES)]
    # the global meta-batch of 8, drawn from (seed, epoch, step), split by global rank: rank r has tasks 4r..4r+3
    data = SinusoidDataModule(**config["data"]["init_args"], seed=config["seed_everything"]).dataset("train")
    for epoch, steps in ((0, 4), (1, 2)):
        for step in range(steps):
            parts = [torch.load(tmp_path / f"rank{r}_epoch{epoch}_step{step}.pt") for r in range(NODES)]
            assert parts[0].shape == (4, 5, 1) and not torch.equal(parts[0], parts[1])
            assert torch.equal(torch.cat(parts), data[(epoch, step)].support_x.to(parts[0].dtype)), (epoch, step)
    # same start on both nodes, then 6 Adam steps of the same learning rate: the 1-process parameters, float64
    initial = [torch.load(tmp_path / f"rank{r}_initial.pt") for r in range(NODES)]
    for key in initial[0]:
        assert torch.equal(initial[0][key], initial[1][key]), key
    multi, one = final_state(tmp_path, "multi"), final_state(tmp_path, "single")
    assert multi["global_step"] == one["global_step"] == 6
    assert_close_float64(multi["state_dict"], one["state_dict"])
    assert any(not torch.equal(v.to(initial[0][k].dtype), initial[0][k]) for k, v in multi["state_dict"].items())


@pytest.mark.parametrize("signalled", ["every node", "node 1 only"])
def test_sigterm_saves_last_ckpt_on_every_node_and_the_resumed_job_is_bitwise_the_uninterrupted_one(tmp_path,
                                                                                                    signalled):
    """Interrupted under (simulated) srun, resumed under torchrun. ``every node``: SLURM's preemption, SIGTERM to
    every task. ``node 1 only``: one node drained (the signal on a rank other than 0, where Lightning's own
    handler, a broadcast from inside the handler, would hang the job): node 0 is never signalled and goes on from
    the pause, both nodes must still save the same step and exit 0. float32 (the default precision): resuming a
    ``precision 64`` run is not exact (Lightning loads the checkpoint into the float32 module before converting
    it to float64)."""
    from test_fault_tolerance import assert_same_state, load, write_config

    config = sinusoid_config()
    run_nodes("torchrun", write_config(config, tmp_path, "straight", 100, []), tmp_path / "logs" / "straight")

    marker = tmp_path / "paused"
    pause = {"class_path": "fault_helpers.PauseAt", "init_args": {"step": 5, "marker": str(marker)}}
    nodes = launch("slurm", write_config(config, tmp_path, "killed", 100, [pause]), tmp_path / "logs" / "killed")
    targets = nodes if signalled == "every node" else nodes[1:]

    def wait_for(paths: list[Path], what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not all(p.exists() for p in paths):
            if any(p.poll() is not None for p in nodes) or time.monotonic() > deadline:
                kill_all(nodes)
                pytest.fail(f"the run ended or hung before {what}:\n{logs_of(nodes)}")
            time.sleep(0.05)

    # both nodes wait at step 5 (epoch 1, batch 0: mid-epoch) for the signal
    wait_for([Path(f"{marker}.rank{r}") for r in range(NODES)], "its pause step")
    for p in targets:
        p.send_signal(signal.SIGTERM)  # the task itself, as slurmstepd signals it
    wait_for([Path(f"{marker}.signalled.rank{nodes.index(p)}") for p in targets], "the signalled nodes noted it")
    Path(f"{marker}.go").write_text("")  # a node that got no signal goes on from the pause
    out = finish(nodes, expect=0)
    assert "SIGTERM received: saved" in out
    last = load(tmp_path / "killed" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 5 and not (tmp_path / "killed" / "final.ckpt").exists()

    run_nodes("torchrun", write_config(config, tmp_path, "killed", 100, []), tmp_path / "logs" / "resumed",
              "--ckpt_path", "last")
    a, b = final_state(tmp_path, "straight"), final_state(tmp_path, "killed")
    assert a["global_step"] == b["global_step"] == 6 and a["epoch"] == b["epoch"]
    assert_same_state(a["state_dict"], b["state_dict"], "state_dict")
    assert_same_state(a["optimizer_states"], b["optimizer_states"], "optimizer_states")


def test_grbal_rollout_aggregation_gathers_across_nodes(tmp_path):
    """GrBAL (tests/test_fault_tolerance.py's tiny config, 2 rollouts per round so that each node collects one):
    3 epochs = the random round and 2 MPC rounds with the model being trained. Each node collects rollout i with
    i % 2 == its rank; after the gather both nodes hold the 1-process run's buffer, bitwise (float64, so the MPC
    plans of the 2-node and the 1-process model agree)."""
    from test_fault_tolerance import assert_same_state, grbal_config, write_config

    config = grbal_config(tmp_path)
    config["data"]["init_args"].update(rollouts_per_round=2)
    dump = lambda folder: {"class_path": "test_multinode.SaveRollouts", "init_args": {"out": str(folder)}}  # noqa: E731
    (tmp_path / "single_rollouts").mkdir()
    single = run_single(write_config(config, tmp_path, "single", 100, [dump(tmp_path / "single_rollouts")]),
                        "--trainer.precision", "64")
    run_nodes("torchrun", write_config(config, tmp_path, "multi", 100, [dump(tmp_path)]), tmp_path / "logs",
              "--trainer.precision", "64")
    wait_single(single)

    one = torch.load(tmp_path / "single_rollouts" / "rollouts_rank0.pt", weights_only=True)
    nodes = [torch.load(tmp_path / f"rollouts_rank{r}.pt", weights_only=True) for r in range(NODES)]
    assert one["round"] == 3 and one["buffer"]["n_rollouts"] == 2 + 2 * 2
    for r, state in enumerate(nodes):
        assert_same_state(state, one, f"node {r}")
    assert_close_float64(final_state(tmp_path, "multi")["state_dict"], final_state(tmp_path, "single")["state_dict"])


def test_the_sbatch_script_runs_train_py_on_every_task_with_the_allocation_s_sizes(tmp_path):
    """scripts/slurm_multinode.sbatch under a stand-in ``srun`` that records its command: one task per device."""
    (tmp_path / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (tmp_path / "srun").chmod(0o755)
    env = {**child_env(), "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "SRUN_ARGS": str(tmp_path / "args"),
           "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_NUM_NODES": "3", "SLURM_NTASKS_PER_NODE": "4",
           "SLURM_CPUS_PER_TASK": "8"}
    run = subprocess.run(["bash", str(REPO / "scripts" / "slurm_multinode.sbatch"), "configs/imaml_sinusoid.yaml",
                          "--trainer.max_steps", "10"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "args").read_text().split() == [
        "--kill-on-bad-exit=1", "python", "train.py", "fit", "--config", "configs/imaml_sinusoid.yaml",
        "--trainer.num_nodes", "3", "--trainer.devices", "4", "--trainer.strategy", "ddp", "--ckpt_path", "last",
        "--trainer.max_steps", "10"]
    header = (REPO / "scripts" / "slurm_multinode.sbatch").read_text()
    for line in ("#SBATCH --signal=TERM@120", "#SBATCH --requeue"):
        assert line in header
