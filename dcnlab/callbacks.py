"""Lightning callbacks of the training framework (configured in conf/callbacks/)."""

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.data import extract_batch_size


class TrainThroughput(Callback):
    """Training throughput in samples per second, over all ranks, logged every epoch.

    Logs ``train/samples_per_s`` and ``train/timed_samples`` (how many samples it is over; on
    CUDA also ``train/peak_memory_gib``) at the end of each training epoch, as running values over
    all timed batches of the fit so far; the last epoch's values are the run's (they land in
    ``metrics.json``).

    What is timed: training batches only, end to end (loading, host-to-device copy, forward,
    backward, optimiser step, logging), after ``warmup_batches`` batches; validation, sanity
    checking and what runs between epochs (checkpointing) are not. The clock is read after a
    ``torch.cuda.synchronize`` at the edges of each timed span (epoch start or end of warm-up,
    up to validation or epoch end), never between batches, so CPU/GPU overlap is kept.
    The warm-up is capped at half the batches of an epoch, so short runs still get a number.

    Under DDP each rank's rate is summed over the ranks: the global samples/s (ranks wait for each
    other every step). ``train/peak_memory_gib`` is the largest ``torch.cuda.max_memory_allocated``
    of any rank (training and validation, since process start).
    """

    def __init__(self, warmup_batches: int = 10) -> None:
        if warmup_batches < 0:
            raise ValueError(f"warmup_batches: expected >= 0, got {warmup_batches}")
        self.warmup_batches = warmup_batches
        self._reset()

    def _reset(self) -> None:
        self._warmup = self.warmup_batches
        self._batches = 0  # training batches seen this fit
        self._samples = 0  # samples in closed spans
        self._seconds = 0.0
        self._span_start: float | None = None
        self._span_samples = 0

    @staticmethod
    def _now(pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def _start_span(self, pl_module: L.LightningModule) -> None:
        self._span_start = self._now(pl_module)
        self._span_samples = 0

    def _end_span(self, pl_module: L.LightningModule) -> None:
        if self._span_start is None:
            return
        self._seconds += self._now(pl_module) - self._span_start
        self._samples += self._span_samples
        self._span_start = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        per_epoch = trainer.num_training_batches  # inf for loaders without a length
        if per_epoch != float("inf"):
            self._warmup = min(self.warmup_batches, int(per_epoch) // 2)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._batches >= self._warmup:
            self._start_span(pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # After a validation run inside the epoch (val_check_interval < 1).
        if self._span_start is None and self._batches >= self._warmup:
            self._start_span(pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches += 1
        if self._span_start is not None:
            self._span_samples += extract_batch_size(batch)
        elif self._batches >= self._warmup:
            self._start_span(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end_span(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end_span(pl_module)
        # Reduced over ranks by Lightning (sync_dist) when it computes the epoch's metrics, not by a
        # collective here: rank 0's progress bar computes (and syncs) the logged metrics at its
        # own point in this hook, so an explicit collective would pair up with the wrong one.
        if self._samples > 0 and self._seconds > 0:
            # Ranks step in lock-step under DDP, so the sum of their rates is the global rate.
            pl_module.log("train/samples_per_s", self._samples / self._seconds, sync_dist=True, reduce_fx="sum")
            pl_module.log("train/timed_samples", float(self._samples), sync_dist=True, reduce_fx="sum")
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            pl_module.log("train/peak_memory_gib", peak, sync_dist=True, reduce_fx="max")
