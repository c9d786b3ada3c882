"""What `python -m dcnlab train|eval` do with a composed Hydra config."""

import json
import netrc
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

CONFIG_KEY = "dcnlab_config"


def wandb_offline() -> bool:
    """True unless a W&B API key is configured (environment or `wandb login`'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


OmegaConf.register_new_resolver("dcnlab_wandb_offline", wandb_offline, replace=True)


class SaveConfigInCheckpoint(Callback):
    """Stores the resolved run config in every checkpoint, so `eval` can rebuild the model."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config


def build(config: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule]:
    """The data module and the task (with its model) of a config with data, model and task."""
    datamodule = instantiate(config.data)
    model = instantiate(
        config.model, dim=datamodule.dim, in_channels=datamodule.in_channels, num_classes=datamodule.num_classes
    )
    task = instantiate(config.task, model=model, num_classes=datamodule.num_classes)
    return datamodule, task


def _trainer(config: DictConfig, callbacks: list[Callback]) -> L.Trainer:
    logger = instantiate(config.logger) if config.get("logger") else False
    if logger is False:
        # logger=none: LearningRateMonitor refuses to run without a logger, and has nothing to do.
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return instantiate(config.trainer, callbacks=callbacks, logger=logger)


def _write_metrics(output_dir: Path, metrics: dict[str, Any]) -> Path:
    path = output_dir / "metrics.json"
    path.write_text(json.dumps({k: float(v) for k, v in sorted(metrics.items())}, indent=2) + "\n")
    return path


def train(config: DictConfig) -> dict[str, float]:
    """Fits (resuming from config.ckpt_path if set), tests the best checkpoint, writes metrics.json."""
    output_dir = Path(config.paths.output_dir)
    L.seed_everything(config.seed, workers=True)
    datamodule, task = build(config)
    resolved = OmegaConf.to_container(config, resolve=True)
    callbacks = [instantiate(c) for c in (config.get("callbacks") or {}).values() if c is not None]
    trainer = _trainer(config, [*callbacks, SaveConfigInCheckpoint(resolved)])
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    trainer.fit(task, datamodule=datamodule, ckpt_path=config.get("ckpt_path"))
    # The last epoch's values, plus the monitored value of the best checkpoint (the one tested).
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    best = trainer.checkpoint_callback
    if best is not None and best.monitor and best.best_model_score is not None:
        metrics[f"best/{best.monitor}"] = float(best.best_model_score)
    if config.get("test"):
        has_best = trainer.checkpoint_callback is not None and trainer.checkpoint_callback.best_model_path
        (results,) = trainer.test(task, datamodule=datamodule, ckpt_path="best" if has_best else None)
        metrics.update(results)
    if trainer.is_global_zero:
        path = _write_metrics(output_dir, metrics)
        print(f"dcnlab: run written to {output_dir.resolve()} (config.yaml, checkpoints/, {path.name})")
    return metrics


def load_run_checkpoint(config: DictConfig) -> tuple[Path, dict[str, Any], DictConfig]:
    """The checkpoint at config.ckpt_path, loaded on the CPU, and its run config with config's
    data/model/task on top; a clear error for a missing path, a missing file or a foreign file."""
    if OmegaConf.is_missing(config, "ckpt_path") or config.ckpt_path is None:
        raise ValueError(
            "ckpt_path: required, a checkpoint of `python -m dcnlab train` (e.g. <run>/checkpoints/last.ckpt)"
        )
    checkpoint_path = Path(config.ckpt_path)
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"ckpt_path: no checkpoint file at {checkpoint_path}")
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    if CONFIG_KEY not in checkpoint:
        raise ValueError(f"ckpt_path: {checkpoint_path} was not written by `python -m dcnlab train` (no run config)")
    saved = OmegaConf.create(checkpoint[CONFIG_KEY])
    overrides = OmegaConf.masked_copy(config, [k for k in ("data", "model", "task") if k in config])
    return checkpoint_path, checkpoint, OmegaConf.merge(saved, overrides)


def evaluate(config: DictConfig) -> dict[str, float]:
    """Rebuilds data, model and task from the checkpoint's config and tests the checkpoint."""
    checkpoint_path, _, run_config = load_run_checkpoint(config)
    datamodule, task = build(run_config)
    output_dir = Path(config.paths.output_dir)
    trainer = _trainer(config, [])
    (results,) = trainer.test(task, datamodule=datamodule, ckpt_path=str(checkpoint_path))
    predictions = torch.cat(trainer.predict(task, dataloaders=datamodule.test_dataloader()))
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        path = _write_metrics(output_dir, results)
        targets = torch.cat([target for _, target in datamodule.test_dataloader()])
        _save_confusion_matrix(predictions, targets, task.num_classes, output_dir / "confusion_matrix.png")
        print(f"dcnlab: evaluation of {checkpoint_path} in {output_dir.resolve()} ({path.name}, confusion_matrix.png)")
    return results


def _save_confusion_matrix(predictions: Tensor, targets: Tensor, num_classes: int, path: Path) -> None:
    """PNG of the test confusion matrix (per sample for classification, per position for segmentation)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    matrix = MulticlassConfusionMatrix(num_classes)
    matrix.update(predictions.flatten(), targets.flatten())
    figure, _ = matrix.plot()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
