"""Classification: (B, C, *spatial) -> one label per sample."""

from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from dcnlab.tasks.base import OptimizerFactory, SchedulerFactory, Task


class ClassificationTask(Task):
    """Cross-entropy on (B, num_classes) logits; metrics: accuracy and macro-F1."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        metrics = MetricCollection(
            {
                "accuracy": MulticlassAccuracy(num_classes, average="micro"),
                "macro_f1": MulticlassF1Score(num_classes, average="macro"),
            }
        )
        super().__init__(model, metrics, optimizer, scheduler, label_smoothing)
        self.num_classes = num_classes
