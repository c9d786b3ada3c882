"""TrainThroughput: every training run records its samples/s in metrics.json.

The DDP case (global samples over 2 ranks) is in tests/test_cli.py's 2-process CPU DDP test."""

import json

import lightning as L
import pytest
from hydra import compose, initialize_config_module
from omegaconf import open_dict

from dcnlab.callbacks import TrainThroughput
from dcnlab.runner import build, train

TINY = ["data.train_samples=32", "data.val_samples=8", "data.test_samples=8", "data.batch_size=8", "model.base_width=4"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(output_dir, overrides):
    with initialize_config_module(version_base="1.3", config_module="dcnlab.conf"):
        config = compose("train", overrides=[*overrides, "callbacks.progress_bar=null", *TINY])
    with open_dict(config):
        config.paths.output_dir = str(output_dir)
    return config


def test_a_training_run_writes_positive_samples_per_second_to_metrics_json(tmp_path):
    metrics = train(_config(tmp_path, ["trainer.max_epochs=2"]))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["train/samples_per_s"] > 0
    assert written["train/samples_per_s"] == pytest.approx(metrics["train/samples_per_s"])
    # 4 batches of 8 per epoch; the warm-up is capped at half an epoch: 2 batches.
    assert written["train/timed_samples"] == 6 * 8
    assert "train/peak_memory_gib" not in written  # CUDA only


def test_a_one_batch_run_still_gets_a_number(tmp_path):
    assert train(_config(tmp_path, ["+trainer.fast_dev_run=true"]))["train/samples_per_s"] > 0


def test_validation_inside_the_epoch_is_not_timed_and_warmup_batches_are_skipped(tmp_path):
    datamodule, task = build(_config(tmp_path, []))
    callback = TrainThroughput(warmup_batches=1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        val_check_interval=2,  # validation after batches 2 and 4 of each epoch
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    validation_seconds = []
    original = task.on_validation_start

    def timed_validation_start():
        validation_seconds.append(callback._span_start)  # the span was closed before validation
        original()

    task.on_validation_start = timed_validation_start
    trainer.fit(task, datamodule=datamodule)
    assert validation_seconds and all(start is None for start in validation_seconds)
    assert callback._samples == 7 * 8 and callback._seconds > 0
    assert trainer.callback_metrics["train/timed_samples"] == 7 * 8


def test_negative_warmup_is_rejected():
    with pytest.raises(ValueError, match="warmup_batches"):
        TrainThroughput(warmup_batches=-1)
