"""train.py's LightningCLI: every config runs, subcommands, user classes by import path, seeding."""

import shlex
import sys
from pathlib import Path

import pytest
import torch

from lit_meta.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # logs and saved configs land here
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # seed_everything sets it; restore it afterwards


def test_there_are_configs():
    assert len(CONFIGS) >= 2


def fake_miniimagenet(root: Path) -> Path:
    """learn2learn-layout pickles: 5 classes x 16 random 84x84 RGB images per split (enough for 5-way 1+15)."""
    import pickle

    import numpy as np

    from lit_meta.datamodules import miniimagenet

    rng = np.random.default_rng(0)
    root.mkdir()
    for split, name in miniimagenet.PICKLE_FILES.items():
        images = rng.integers(0, 256, (5 * 16, 84, 84, 3), dtype=np.uint8)
        classes = {f"{split}{c}": list(range(c * 16, (c + 1) * 16)) for c in range(5)}
        with open(root / name, "wb") as f:
            pickle.dump({"image_data": images, "class_dict": classes}, f)
    return root


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_runs_fast_dev_run(config, tmp_path):
    extra = []
    if "miniimagenet" in config.stem:  # no real Mini-ImageNet here: tiny files in its layout
        extra = ["--data.init_args.data_dir", str(fake_miniimagenet(tmp_path / "mini"))]
    # The config as written, with 4 tasks per step so the heavy ones (20-way 5-shot) stay fast
    small = ["--data.init_args.meta_batch_size", "4", "--data.init_args.eval_meta_batch_size", "4"]
    if "RolloutDataModule" in config.read_text():  # one short rollout per split instead of thousands of steps
        small += ["--data.init_args.initial_rollouts", "1", "--data.init_args.val_rollouts", "1",
                  "--data.init_args.rollout_length", "40", "--data.init_args.n_envs", "1",
                  "--data.init_args.eval_episodes", "4"]
    cli = main(["fit", "--config", str(config), "--trainer.fast_dev_run", "1", *small, *extra])
    assert cli.trainer.state.finished
    # the training loss of the one step: train/query_loss; PETS logs its minimised NLL every step and the
    # ensemble-mean MSE (train/query_loss, one more forward) only on the steps the loggers record (tests/test_ensemble.py)
    loss = "train/nll" if "lit_meta.rl.PETS" in config.read_text() else "train/query_loss"
    assert any(k.startswith(loss) for k in cli.trainer.callback_metrics)


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_validate_and_test_subcommands(subcommand):
    cli = main([subcommand, "--config", str(REPO / "configs" / "baseline_sinusoid.yaml"), "--trainer.fast_dev_run", "1"])
    stage = "val" if subcommand == "validate" else "test"
    assert f"{stage}/query_loss" in cli.trainer.callback_metrics


def test_print_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "baseline_omniglot.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lit_meta.FineTune" in printed and "lit_meta.datamodules.OmniglotDataModule" in printed
    assert "seed_everything: 0" in printed


def test_a_users_own_module_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_project.py").write_text(
        "from lit_meta import FineTune\n\n"
        "class MyLearner(FineTune):\n"
        "    \"\"\"A user's subclass.\"\"\"\n"
        "    def __init__(self, scale: float = 2.0, **kwargs):\n"
        "        super().__init__(**kwargs)\n"
        "        self.scale = scale\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cli = main(["fit", "--config", str(REPO / "configs" / "baseline_sinusoid.yaml"), "--trainer.fast_dev_run", "1",
                "--model", "my_project.MyLearner", "--model.scale", "3.0",
                "--model.net", "lit_meta.MLP"])
    assert type(cli.model).__name__ == "MyLearner" and cli.model.scale == 3.0
    sys.modules.pop("my_project", None)


def _train_losses(seed: int) -> list[float]:
    cli = main(["--config", str(REPO / "configs" / "baseline_sinusoid.yaml"), "--seed_everything", str(seed),
                "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
                "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
                "--model.init_args.net.init_args.hidden", "[8]"],
               run=False)
    losses = []
    original = cli.model.log_train_metrics

    def record(outputs, episode):
        loss = original(outputs, episode)
        losses.append(loss.item())
        return loss

    cli.model.log_train_metrics = record
    cli.trainer.fit(cli.model, cli.datamodule)
    return losses


def test_same_config_and_seed_give_same_episodes_and_losses():
    a, b, c = _train_losses(0), _train_losses(0), _train_losses(1)
    assert len(a) == 3 and a == b and a != c


def test_a_checkpoint_from_train_py_loads_without_the_config(tmp_path):
    import lit_meta

    cli = main(["fit", "--config", str(REPO / "configs" / "imaml_sinusoid.yaml"), "--trainer.max_steps", "2",
                "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                "--model.init_args.net.init_args.hidden", "[8]",
                "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)])
    (ckpt,) = tmp_path.glob("**/*.ckpt")
    loaded = lit_meta.IMAML.load_from_checkpoint(ckpt)  # no config, no net given
    assert loaded.net.layers[0].out_features == 8 and loaded.lam == cli.model.lam
    for (k, a), b in zip(cli.model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    episode = cli.datamodule.dataset("val")[(0, 0)]
    expected = cli.model.predict(cli.model.adapt(episode.support_x, episode.support_y), episode.query_x)
    assert torch.allclose(loaded.predict(loaded.adapt(episode.support_x, episode.support_y), episode.query_x), expected)


def test_a_python_built_module_reloads_with_its_net(tmp_path):
    import lightning as L

    import lit_meta
    from lit_meta.datamodules import SinusoidDataModule

    model = lit_meta.IMAML(lit_meta.MLP(hidden=(4,)), lam=3.0, inner_steps=2, cg_steps=2)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, default_root_dir=tmp_path,
                        enable_progress_bar=False)
    trainer.fit(model, SinusoidDataModule(meta_batch_size=2))
    (ckpt,) = tmp_path.glob("**/*.ckpt")
    saved = torch.load(ckpt, weights_only=True)["hyper_parameters"]  # no pickled objects
    assert "net" not in saved and saved["lam"] == 3.0
    loaded = lit_meta.IMAML.load_from_checkpoint(ckpt, net=lit_meta.MLP(hidden=(4,)))
    assert loaded.lam == 3.0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_fit_ends_with_a_summary_of_metrics_checkpoints_and_commands(capsys, caplog):
    """train.py fit answers: headline metrics with their CIs, where the checkpoints and logs are, how to resume and
    test; known third-party noise is gone, a real warning still shows."""
    import logging
    import warnings

    caplog.set_level(logging.INFO)
    config = str(REPO / "configs" / "imaml_sinusoid.yaml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", "--config", config, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
              "--trainer.limit_val_batches", "2", "--model.init_args.net.init_args.hidden", "[8]"])
        warnings.warn("a real warning")
    out = capsys.readouterr().out
    assert "lit-meta: fit finished after" in out
    assert "val/query_loss" in out and "(95% CI)" in out  # the sinusoid has no accuracy: its loss with its CI
    assert "checkpoints: " in out and "last: last.ckpt" in out and "logs:" in out
    assert f"resume:      python train.py fit --config {config}" in out and "--ckpt_path last" in out
    assert "test:        python train.py test --config" in out
    messages = [str(w.message) for w in caught]
    assert "a real warning" in messages
    assert not any("LeafSpec" in m or "overridden `on_after_batch_transfer`" in m for m in messages), messages
    assert "Seed set to" in caplog.text and "litlogger" not in caplog.text  # Lightning's info lines stay, the advert goes


def test_the_summary_of_a_run_with_a_json_argument_quotes_it(tmp_path, capsys):
    """Before: a fit given a JSON value (``--model.init_args.optimizer.init_args '{"lr": 0.01}'``, as the RL docs'
    ``--model.init_args.mpc``) trained to the end, then its summary's ``str.format`` read the braces as a field
    (KeyError) and train.py exited 1 after a successful run."""
    config = str(REPO / "configs" / "imaml_sinusoid.yaml")
    value = '{"lr": 0.01}'
    main(["fit", "--config", config, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
          "--trainer.default_root_dir", str(tmp_path), "--model.init_args.net.init_args.hidden", "[4]",
          "--model.init_args.optimizer.init_args", value])
    out = capsys.readouterr().out
    assert f"resume:      python train.py fit --config {config}" in out
    assert f"--model.init_args.optimizer.init_args {shlex.quote(value)} --ckpt_path last" in out
