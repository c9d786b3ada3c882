"""Segmentation: (B, C, *spatial) -> a label per position, class 0 the background."""

from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.segmentation import DiceScore, MeanIoU

from dcnlab.tasks.base import OptimizerFactory, SchedulerFactory, Task


class SegmentationTask(Task):
    """Cross-entropy on (B, num_classes, *spatial) logits; metrics: Dice and IoU over the
    foreground classes (macro-averaged; class 0 is the background)."""

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
                "dice": DiceScore(num_classes, include_background=False, average="macro", input_format="index"),
                "iou": MeanIoU(num_classes, include_background=False, input_format="index"),
            }
        )
        super().__init__(model, metrics, optimizer, scheduler, label_smoothing)
        self.num_classes = num_classes
