"""What classification and segmentation share: the model, the loss, optimisation and metric logging."""

from collections.abc import Callable, Iterable

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

STAGES = ("train", "val", "test")


class Task(L.LightningModule):
    """A model trained with cross-entropy, evaluated with a torchmetrics collection per stage.

    Args:
        model: maps a batch of inputs to logits.
        metrics: the stage-independent metric collection; each stage gets its own clone.
        optimizer: builds the optimiser from the parameters (a Hydra `_partial_` config or any
            callable); AdamW with lr 1e-3 when None.
        scheduler: builds an LR scheduler from the optimiser, stepped every epoch; None for none.
        label_smoothing: of the cross-entropy.
    """

    def __init__(
        self,
        model: nn.Module,
        metrics: MetricCollection,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        # ModuleDict keys may not be "train"-like attribute names of nn.Module, hence the suffix.
        self.metrics = nn.ModuleDict({f"{stage}_metrics": metrics.clone(prefix=f"{stage}/") for stage in STAGES})

    def forward(self, input: Tensor) -> Tensor:
        return self.model(input)

    def predictions(self, logits: Tensor) -> Tensor:
        """Class indices from logits: (B, classes, ...) -> (B, ...)."""
        return logits.argmax(dim=1)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        input, target = batch
        logits = self(input)
        loss = self.loss(logits, target)
        metrics = self.metrics[f"{stage}_metrics"]
        metrics.update(self.predictions(logits.detach()), target)
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=stage == "train", on_epoch=True, batch_size=len(input))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self.predictions(self(batch[0]))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """On resume, the learning-rate schedule is this run's: its scheduler is rebuilt from the
        config and stepped to the checkpoint's epoch, and its state and learning rate replace the
        saved ones. With an unchanged config that is what was saved; with a larger
        trainer.max_epochs the cosine's T_max follows it, so a resumed run takes the learning rate a
        run of the new length has at that epoch (instead of running past the end of the old cycle)."""
        schedulers = checkpoint.get("lr_schedulers")
        optimizers = checkpoint.get("optimizer_states")
        if self.scheduler_factory is None or not schedulers or not optimizers:
            return
        state, groups = schedulers[0], optimizers[0].get("param_groups", [])
        if "base_lrs" not in state or "last_epoch" not in state or len(groups) != len(state["base_lrs"]):
            return
        probe = torch.optim.SGD(
            [{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in state["base_lrs"]]
        )
        scheduler = self.scheduler_factory(probe)
        if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
            return
        for _ in range(state["last_epoch"]):
            probe.step()  # no gradients: changes nothing, but orders the calls as the scheduler expects
            scheduler.step()
        state.clear()
        state.update(scheduler.state_dict())
        for group, lr in zip(groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr

    def configure_optimizers(self):
        optimizer = (
            self.optimizer_factory(self.parameters())
            if self.optimizer_factory is not None
            else torch.optim.AdamW(self.parameters(), lr=1e-3)
        )
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"},
        }
