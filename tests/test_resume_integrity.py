"""Resume never lands in a silently wrong state: the config given wins where the checkpoint can take it (and the
run lists what differs), an incompatible change or another run's ``last.ckpt`` is refused before anything starts,
a damaged or foreign checkpoint is named with the good ones beside it, a killed writer's temporary file goes away.
Real ``train.py`` CLI runs (in process), the sinusoid iMAML config shrunk to a few steps."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from lit_meta.checkpointing import RUN_KEY, check_resume, config_differences, run_identity
from lit_meta.cli import main
from lit_meta.datamodules.files import atomic_torch_save, remove_stale_temporaries

REPO = Path(__file__).resolve().parents[1]


def fit(tmp: Path, steps: int, *extra: str):
    """``train.py fit`` of the sinusoid iMAML config for ``steps`` meta-updates, checkpoints in ``tmp/ckpts``."""
    args = ["fit", "--config", str(REPO / "configs" / "imaml_sinusoid.yaml"), "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", "null", "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
            "--trainer.callbacks", "lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.dirpath", str(tmp / "ckpts"), "--trainer.callbacks.save_last", "true",
            "--model.init_args.inner_steps", "2", "--data.init_args.meta_batch_size", "4", *extra]
    return main(args)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_checkpoints_carry_the_run_identity(tmp_path):
    cli = fit(tmp_path, 2)
    saved = load(tmp_path / "ckpts" / "last.ckpt")[RUN_KEY]
    assert saved["config"]["model"]["init_args"]["inner_lr"] == 0.02 and saved["config"]["seed_everything"] == 0
    assert saved["world_size"] == 1 and len(saved["fingerprint"]) == 16
    assert saved["fingerprint"] == run_identity(cli.config["fit"].as_dict())["fingerprint"]


def test_an_explicit_file_resume_runs_with_the_config_and_says_what_differs(tmp_path, caplog):
    fit(tmp_path, 2)
    last = tmp_path / "ckpts" / "last.ckpt"
    with caplog.at_level(logging.WARNING, logger="lit_meta.checkpointing"):
        cli = fit(tmp_path, 4, "--ckpt_path", str(last), "--model.init_args.inner_lr", "0.01",
                  "--model.init_args.optimizer.init_args.lr", "0.0005")
    # Lightning's default for a file: the checkpoint's hyperparameters replace the command line's (inner_lr 0.02)
    assert cli.model.inner_lr == 0.01 and cli.trainer.global_step == 4
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == 0.0005  # not the restored 0.001
    assert load(last)["optimizer_states"][0]["param_groups"][0]["lr"] == 0.0005
    assert "model.init_args.inner_lr: 0.02 (checkpoint) -> 0.01 (config)" in caplog.text
    assert "model.init_args.optimizer.init_args.lr: 0.001 (checkpoint) -> 0.0005 (config)" in caplog.text


@pytest.mark.parametrize("how", ["file", "last"])
def test_an_incompatible_change_is_refused_before_anything_starts_naming_both_values(tmp_path, how):
    fit(tmp_path, 2)
    last = tmp_path / "ckpts" / "last.ckpt"
    before = last.read_bytes()
    with pytest.raises(ValueError, match=r"parameter shapes differ: net\.layers\.0\.bias: \[40\] \(checkpoint\) vs "
                                         r"\[20\] \(config\).*model\.init_args\.net\.init_args\.hidden: \[40, 40\] "
                                         r"\(checkpoint\) -> \[20, 20\] \(config\)"):
        fit(tmp_path, 4, "--ckpt_path", str(last) if how == "file" else "last",
            "--model.init_args.net.init_args.hidden", "[20, 20]")
    assert last.read_bytes() == before and sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]


def test_last_resumes_its_own_run_and_refuses_another_runs_checkpoint(tmp_path):
    fit(tmp_path, 2)
    # the same config: continues
    assert fit(tmp_path, 3, "--ckpt_path", "last").trainer.global_step == 3
    # a changed config whose run died before its first checkpoint: `last` would pick the other run's file
    last = tmp_path / "ckpts" / "last.ckpt"
    with pytest.raises(ValueError, match=r"--ckpt_path last found .*last\.ckpt, written by another run "
                                         r"\(fingerprint \w+, this config \w+\): model\.init_args\.inner_lr: 0\.02 "
                                         r"\(checkpoint\) -> 0\.05 \(config\)\. Nothing was started.*pass it explicitly"):
        fit(tmp_path, 5, "--ckpt_path", "last", "--model.init_args.inner_lr", "0.05")
    with pytest.raises(ValueError, match=r"seed_everything: 0 \(checkpoint\) -> 1 \(config\)"):
        fit(tmp_path, 5, "--ckpt_path", "last", "--seed_everything", "1")
    with pytest.raises(ValueError, match=r"data\.init_args\.k_query: 10 \(checkpoint\) -> 5 \(config\)"):
        fit(tmp_path, 5, "--ckpt_path", "last", "--data.init_args.k_query", "5")
    assert load(last)["global_step"] == 3  # untouched
    # the explicit choice the message offers works
    assert fit(tmp_path, 5, "--ckpt_path", str(last), "--model.init_args.inner_lr", "0.05").model.inner_lr == 0.05


def damage_tensor_bytes(path: Path) -> None:
    """Flip one byte inside the largest tensor's stored data (what a bad disk sector does)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["file", "last"])
def test_a_checkpoint_with_damaged_tensor_bytes_is_refused_naming_the_good_ones(tmp_path, how):
    fit(tmp_path, 2, "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_top_k", "-1")
    last = tmp_path / "ckpts" / "last.ckpt"
    damage_tensor_bytes(last)
    assert load(last)["global_step"] == 2  # torch.load alone takes it: wrong numbers, no error
    with pytest.raises(ValueError, match=r"last\.ckpt' is damaged: .*CRC-32.*other checkpoints in .*"
                                         r"\['epoch=0-step=1\.ckpt', 'epoch=0-step=2\.ckpt'\]"):
        fit(tmp_path, 4, "--ckpt_path", str(last) if how == "file" else "last")


def test_a_truncated_last_checkpoint_is_named_when_resumed_as_last(tmp_path):
    fit(tmp_path, 2, "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_top_k", "-1")
    last = tmp_path / "ckpts" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"last\.ckpt' is not a readable checkpoint \(truncated.*"
                                         r"other checkpoints in .*epoch=0-step=2\.ckpt"):
        fit(tmp_path, 4, "--ckpt_path", "last")
    assert last.exists()  # nothing deleted


def test_a_torch_file_that_is_not_a_checkpoint_is_named(tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save({"net.layers.0.weight": torch.zeros(40, 1)}, weights)
    with pytest.raises(ValueError, match=r"ckpt_path='.*weights\.pt' is a torch file but not a Lightning checkpoint "
                                         r"\(no 'state_dict'; found \['net\.layers\.0\.weight'\]\)"):
        fit(tmp_path, 2, "--ckpt_path", str(weights))


def test_a_killed_writers_temporary_file_is_removed_by_the_next_save(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.ckpt.{int(dead.stdout)}.k3j2x.tmp"
    live = tmp_path / f".last.ckpt.{os.getppid()}.a8f0q.tmp"  # a writer that still runs: left alone
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    atomic_torch_save({"w": torch.ones(3)}, tmp_path / "last.ckpt")
    assert not stale.exists() and live.exists() and load(tmp_path / "last.ckpt")["w"].sum() == 3
    assert remove_stale_temporaries(tmp_path) == []


def test_another_world_size_is_reported(tmp_path, caplog):
    cli = fit(tmp_path, 2)
    last = tmp_path / "ckpts" / "last.ckpt"
    checkpoint = load(last)
    checkpoint[RUN_KEY]["world_size"] = 2
    atomic_torch_save(checkpoint, last)
    with caplog.at_level(logging.WARNING, logger="lit_meta.checkpointing"):
        assert check_resume(last, "last", cli.model, cli.config["fit"].as_dict(), world_size=1) == []
    assert "on 1 processes (it was written by 2): the global meta-batch and its episodes are the same" in caplog.text


def test_a_float64_run_resumes_exactly(tmp_path):
    """Before: the resumed weights went through float32 (Lightning loads them before converting the module)."""
    every = ("--trainer.precision", "64", "--trainer.callbacks.every_n_train_steps", "2",
             "--trainer.callbacks.save_top_k", "-1")
    straight = fit(tmp_path, 4, *every)
    resumed = fit(tmp_path / "resumed", 4, *every, "--ckpt_path", str(tmp_path / "ckpts" / "epoch=0-step=2.ckpt"))
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert a.dtype == torch.float64 and torch.equal(a, b), name


def test_config_differences_are_leafwise():
    old = {"model": {"init_args": {"lr": 1, "net": {"hidden": [40]}}}, "seed": 0}
    new = {"model": {"init_args": {"lr": 2, "net": {"hidden": [40]}, "extra": True}}, "seed": 0}
    assert config_differences(old, new) == [("model.init_args.extra", None, True), ("model.init_args.lr", 1, 2)]


def test_the_readme_main_job_writes_a_checkpoint_to_resume_from():
    config = yaml.safe_load((REPO / "configs" / "imaml_omniglot_5w1s_quick.yaml").read_text())
    every = next(c["init_args"]["every_n_train_steps"] for c in config["trainer"]["callbacks"]
                 if c["class_path"].endswith("ModelCheckpoint"))
    assert every < config["trainer"]["max_steps"], "a kill before the end would leave nothing to resume from"
