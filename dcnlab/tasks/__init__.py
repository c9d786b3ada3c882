"""LightningModules: what is optimised and measured for each kind of task."""

from dcnlab.tasks.base import Task
from dcnlab.tasks.classification import ClassificationTask
from dcnlab.tasks.segmentation import SegmentationTask

__all__ = ["ClassificationTask", "SegmentationTask", "Task"]
