"""Fault tolerance: a SIGKILLed train.py resumed with ``--ckpt_path last`` ends bitwise equal to the run that was never
stopped (iMAML on Omniglot; GrBAL with its replay buffer, statistics and MPC aggregation rounds); SIGTERM saves and
exits cleanly; an interrupted checkpoint write leaves the previous checkpoint usable; checkpoints are
``weights_only``-loadable. Real subprocesses, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lit_meta.checkpointing import AtomicCheckpointIO

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def imaml_config(tmp: Path) -> dict:
    """The README's quick iMAML config shrunk to seconds: 4 steps per epoch, a checkpoint every 3 steps."""
    config = yaml.safe_load((REPO / "configs" / "imaml_omniglot_5w1s_quick.yaml").read_text())
    config["trainer"].update(max_steps=10, val_check_interval=None, check_val_every_n_epoch=1, limit_val_batches=0,
                             num_sanity_val_steps=0, enable_progress_bar=False)
    net = config["model"]["init_args"]
    net["net"]["init_args"]["hidden"], net["inner_steps"] = 8, 3
    config["data"]["init_args"].update(meta_batch_size=4, steps_per_epoch=4, eval_episodes=20)
    return config


def grbal_config(tmp: Path) -> dict:
    """GrBAL on the crippled HalfCheetah shrunk to seconds: a small MLP, short rollouts, an MPC round each epoch."""
    config = yaml.safe_load((REPO / "configs" / "grbal_halfcheetah_crippled.yaml").read_text())
    config["trainer"].update(max_epochs=3, limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False)
    model = config["model"]["init_args"]
    model["net"] = {"class_path": "lit_meta.MLP", "init_args": {"in_features": 23, "out_features": 18,
                                                                "hidden": [32, 32]}}
    model["mpc"] = {"planner": "random_shooting", "horizon": 3, "n_candidates": 16}
    config["data"]["init_args"].update(past_window=4, future_window=4, meta_batch_size=4, initial_rollouts=2,
                                       rollouts_per_round=1, rollout_length=30, val_rollouts=1, n_envs=1,
                                       steps_per_epoch=4, eval_episodes=4, eval_meta_batch_size=4)
    return config


def write_config(config: dict, tmp: Path, name: str, every: int, extra_callbacks: list[dict]) -> Path:
    config = {**config, "trainer": dict(config["trainer"])}
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp / name / "checkpoints"), "save_last": True, "every_n_train_steps": every}},
        {"class_path": "fault_helpers.SaveAtEnd", "init_args": {"path": str(tmp / name / "final.ckpt")}},
        *extra_callbacks,
    ]
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": str(tmp / "logs"), "name": name}}
    path = tmp / f"{name}_{len(extra_callbacks)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(config: Path, *extra: str, wait: bool = True) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    process = subprocess.Popen([sys.executable, "train.py", "fit", "--config", str(config), *extra], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = process.communicate(timeout=300)
        assert process.returncode == 0, out[-3000:]
        process.output = out
    return process


def interrupt(config: Path, marker: Path, signum: int) -> subprocess.Popen:
    """Start the run, wait until it paused at the marker step (mid-epoch), send ``signum``."""
    process = train(config, wait=False)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the run ended before its pause step: {process.stdout.read()[-3000:]}")
        time.sleep(0.05)
    process.send_signal(signum)
    process.output, _ = process.communicate(timeout=120)
    return process


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict, what: str = "") -> None:
    """Recursively equal: tensors bitwise, everything else by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), what
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{what}: {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same_state(a[key], b[key], f"{what}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{what}[{i}]")
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def assert_resumed_equals_uninterrupted(config: dict, tmp: Path, every: int, kill_at: int, datamodule_key: str = "",
                                        signum: int = signal.SIGKILL) -> dict:
    straight = write_config(config, tmp, "straight", every, [])
    train(straight)
    marker = tmp / "paused"
    killed = write_config(config, tmp, "killed", every, [
        {"class_path": "fault_helpers.PauseAt", "init_args": {"step": kill_at, "marker": str(marker)}}])
    process = interrupt(killed, marker, signum)
    last = tmp / "killed" / "checkpoints" / "last.ckpt"
    assert not (tmp / "killed" / "final.ckpt").exists(), "the interrupted run must not have finished"
    # resumed with a config that does not pause (same run otherwise)
    resumed = write_config(config, tmp, "killed", every, [])
    train(resumed, "--ckpt_path", "last")
    a, b = load(tmp / "straight" / "final.ckpt"), load(tmp / "killed" / "final.ckpt")
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    assert_same_state(a["state_dict"], b["state_dict"], "state_dict")
    assert_same_state(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    if datamodule_key:
        assert_same_state(a[datamodule_key], b[datamodule_key], datamodule_key)
    return {"process": process, "last": last}


def test_sigkill_mid_epoch_then_resume_is_bitwise_the_uninterrupted_imaml_run(tmp_path):
    # 4 steps per epoch; checkpoints at steps 3 and 6 (mid-epoch: epoch 0 batch 2, epoch 1 batch 1); killed at step 7
    out = assert_resumed_equals_uninterrupted(imaml_config(tmp_path), tmp_path, every=3, kill_at=7)
    assert out["process"].returncode == -signal.SIGKILL
    assert load(out["last"])["global_step"] >= 6  # what the resumed run started from


def test_sigkill_then_resume_grbal_with_replay_buffer_and_aggregation_rounds(tmp_path):
    # epoch 1 starts with an MPC aggregation round; the checkpoint at step 5 is after it (epoch 1, batch 0), the
    # kill at step 7: the resumed run must not collect round 1 again, and epoch 2's round must match
    out = assert_resumed_equals_uninterrupted(grbal_config(tmp_path), tmp_path, every=5, kill_at=7,
                                              datamodule_key="RolloutDataModule")
    assert out["process"].returncode == -signal.SIGKILL
    assert load(tmp_path / "killed" / "final.ckpt")["RolloutDataModule"]["round"] == 3


def test_sigterm_saves_last_checkpoint_exits_cleanly_and_resumes_exactly(tmp_path):
    # no periodic checkpoint before the signal (every 100 steps): everything comes from the SIGTERM checkpoint
    out = assert_resumed_equals_uninterrupted(imaml_config(tmp_path), tmp_path, every=100, kill_at=5,
                                              signum=signal.SIGTERM)
    assert out["process"].returncode == 0, out["process"].output[-2000:]
    assert "SIGTERM received: saved" in out["process"].output
    assert load(out["last"])["global_step"] == 5


class _Interrupted(BaseException):
    pass


def test_an_interrupted_checkpoint_write_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # bytes reach the file, then the process "dies"
        raise _Interrupted

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(_Interrupted):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    state = torch.load(path, weights_only=True)
    assert state["global_step"] == 1 and torch.equal(state["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no temporary file left behind"


def test_a_killed_writer_process_leaves_the_previous_checkpoint_usable(tmp_path):
    """A real SIGKILL while a (large) checkpoint is being written: the old file is intact, the new never torn."""
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(1)}, path)
    code = ("import sys, torch; from lit_meta.checkpointing import AtomicCheckpointIO; "
            "print('writing', flush=True); "
            "AtomicCheckpointIO().save_checkpoint({'step': torch.tensor(2), 'big': torch.ones(2**25)}, sys.argv[1])")
    process = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()) and process.poll() is None:
        time.sleep(0.005)
    process.kill()
    process.wait()
    assert int(torch.load(path, weights_only=True)["step"]) in (1, 2)  # old or (if it won the race) new, never torn


def test_train_py_checkpoints_load_weights_only(tmp_path):
    config = write_config(imaml_config(tmp_path), tmp_path, "plain", 5, [])
    train(config)
    for path in (tmp_path / "plain" / "checkpoints").glob("*.ckpt"):
        state = torch.load(path, weights_only=True)
        assert "RNGStateCheckpoint" in state["callbacks"] and "state_dict" in state
        assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["served"] >= 1


@pytest.mark.parametrize("content, error, message", [
    (None, FileNotFoundError, r"ckpt_path='.*missing\.ckpt' does not exist; other checkpoints in .*: \['good\.ckpt'\]"),
    (b"not a checkpoint", ValueError, r"is not a readable checkpoint \(truncated.*other checkpoints.*good\.ckpt"),
    ("truncated", ValueError, r"is not a readable checkpoint \(truncated"),
])
def test_a_bad_ckpt_path_is_named_before_anything_starts(tmp_path, content, error, message):
    from lit_meta.cli import main

    good = tmp_path / "good.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1000)}}, good)
    bad = tmp_path / "missing.ckpt"
    if content == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif content is not None:
        bad.write_bytes(content)
    with pytest.raises(error, match=message):
        main(["fit", "--config", str(REPO / "configs" / "imaml_sinusoid.yaml"), "--ckpt_path", str(bad)])
    assert good.exists() and (content is None or bad.exists())  # nothing deleted
