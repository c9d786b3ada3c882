"""`python -m dcnlab train|eval`: configs composed with Hydra's compose API, outputs in tmp dirs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import open_dict

from dcnlab.runner import CONFIG_KEY, build, evaluate, train

PRESETS = ["shapes2d", "signals1d", "volumes3d", "shapes2d_seg", "volumes3d_seg"]
TINY_DATA = ["data.train_samples=16", "data.val_samples=8", "data.test_samples=8", "data.batch_size=8"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(name: str, output_dir: Path, overrides: list[str]):
    with initialize_config_module(version_base="1.3", config_module="dcnlab.conf"):
        config = compose(name, overrides=overrides)
    with open_dict(config):
        config.paths.output_dir = str(output_dir)
    return config


def _tiny_model(preset: str) -> list[str]:
    return ["model.base_channels=4", "model.depth=2"] if preset.endswith("_seg") else ["model.base_width=4"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_runs_one_fast_dev_batch(preset, tmp_path):
    config = _config(
        "train", tmp_path, [f"experiment={preset}", "+trainer.fast_dev_run=true", *TINY_DATA, *_tiny_model(preset)]
    )
    metrics = train(config)
    assert ("test/accuracy" in metrics) != preset.endswith("_seg")
    assert ("test/dice" in metrics) == preset.endswith("_seg")
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)


@pytest.mark.parametrize("model", ["dcnv3net", "unet", "resnet50"])
def test_a_preset_takes_any_backbone(model, tmp_path):
    # A preset's model settings belong to its model config, so another backbone replaces them whole.
    config = _config("train", tmp_path, ["experiment=volumes3d", f"model={model}"])
    assert config.model.name == model and config.model.get("base_width") != 16
    _, task = build(config)
    assert sum(p.numel() for p in task.model.parameters()) > 0


def test_train_then_eval_gives_the_same_test_metrics_and_resume_continues(tmp_path):
    run = tmp_path / "run"
    overrides = ["trainer.max_epochs=2", *TINY_DATA, "model.base_width=4"]
    metrics = train(_config("train", run, overrides))
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    checkpoint = torch.load(best, map_location="cpu", weights_only=False)
    assert checkpoint[CONFIG_KEY]["model"]["name"] == "resnet18"
    # metrics.json carries the monitored value of the best checkpoint next to the last epoch's.
    best_state = "ModelCheckpoint{'monitor': 'val/loss'"
    (score,) = [s["best_model_score"] for k, s in checkpoint["callbacks"].items() if k.startswith(best_state)]
    assert metrics["best/val/loss"] == pytest.approx(float(score)) and metrics["best/val/loss"] <= metrics["val/loss"]

    evaluation = evaluate(_config("eval", tmp_path / "eval", [f"ckpt_path={best}"]))
    assert evaluation["test/accuracy"] == pytest.approx(metrics["test/accuracy"])
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == pytest.approx(evaluation)
    assert (tmp_path / "eval" / "confusion_matrix.png").read_bytes().startswith(b"\x89PNG")

    last = run / "checkpoints" / "last.ckpt"
    steps = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    resumed = tmp_path / "resumed"
    train(_config("train", resumed, [*overrides[1:], "trainer.max_epochs=3", f"ckpt_path={last}"]))
    state = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 2 and state["global_step"] == steps * 3 // 2
    # The cosine schedule follows the new max_epochs (its T_max), its progress the checkpoint's.
    (scheduler,) = state["lr_schedulers"]
    previous = torch.load(last, map_location="cpu", weights_only=False)["lr_schedulers"][0]
    assert previous["T_max"] == 2 and scheduler["T_max"] == 3
    assert scheduler["last_epoch"] == previous["last_epoch"] + 1


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dcnlab", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=120
    )


def test_cli_errors_are_short_and_name_the_problem(tmp_path):
    usage = _cli(cwd=tmp_path)
    assert usage.returncode == 2 and "usage: python -m dcnlab COMMAND" in usage.stderr
    bad = _cli("train", "trainer.bogus=1", f"hydra.run.dir={tmp_path}/bad", cwd=tmp_path)
    assert bad.returncode != 0 and "trainer.bogus" in bad.stderr and "Traceback" not in bad.stderr
    missing = _cli("eval", f"ckpt_path={tmp_path}/none.ckpt", f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path)
    assert missing.returncode != 0 and "ckpt_path: no checkpoint file at" in missing.stderr
    assert "Traceback" not in missing.stderr
    unset = _cli("eval", f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path)
    assert unset.returncode != 0 and "ckpt_path: required" in unset.stderr and "Traceback" not in unset.stderr


TINY_RUN = [*TINY_DATA, "model.base_width=4"]


def test_multirun_sweep_writes_one_run_per_job(tmp_path):
    sweep = _cli(
        "train", "-m", "seed=0,1", "+trainer.fast_dev_run=true", *TINY_RUN, f"hydra.sweep.dir={tmp_path}", cwd=tmp_path
    )
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    for job in ("0", "1"):
        assert json.loads((tmp_path / job / "metrics.json").read_text())["test/loss"] > 0


def test_two_process_ddp_on_cpu_trains_and_writes_one_run(tmp_path):
    run = tmp_path / "ddp"
    overrides = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=1", *TINY_RUN]
    result = _cli("train", *overrides, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
    assert (run / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert "test/accuracy" in metrics
    # Throughput counts both ranks' samples: 16 training samples, one batch of 8 per rank, no warm-up
    # left in a one-batch epoch.
    assert metrics["train/timed_samples"] == 16 and metrics["train/samples_per_s"] > 0


def test_wandb_logger_runs_offline_without_an_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no netrc entry from a `wandb login` either
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = ["logger=wandb", "logger.name=offline-test", "trainer.max_epochs=1", *TINY_RUN]
    train(_config("train", tmp_path, overrides))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))


def test_tensorboard_logger_writes_event_files(tmp_path):
    train(_config("train", tmp_path, ["logger=tensorboard", "trainer.max_epochs=1", *TINY_RUN]))
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))


def test_logger_none_trains_without_a_logger(tmp_path):
    metrics = train(_config("train", tmp_path, ["logger=none", "trainer.max_epochs=1", *TINY_RUN]))
    assert "test/accuracy" in metrics and (tmp_path / "metrics.json").is_file()
    assert not (tmp_path / "csv").exists()
