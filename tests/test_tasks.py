"""dcnlab.tasks: the classification and segmentation LightningModules, trained on toy data."""

import copy
import functools

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dcnlab.models import create_model
from dcnlab.tasks import ClassificationTask, SegmentationTask

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(max_epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _loader(inputs, targets, shuffle=False):
    return DataLoader(TensorDataset(inputs, targets), batch_size=32, shuffle=shuffle)


def _signals(count: int, seed: int):
    # Two classes of 1D signals: a bump on the left or on the right, at a jittered position.
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (count,), generator=generator)
    grid = torch.linspace(0, 1, 32)
    centre = torch.where(labels == 0, 0.3, 0.7) + 0.05 * torch.randn(count, generator=generator)
    signals = torch.exp(-(((grid - centre[:, None]) / 0.08) ** 2)) + 0.1 * torch.randn(count, 32, generator=generator)
    return signals[:, None], labels


def test_classification_task_learns_and_reports_accuracy_and_macro_f1():
    torch.manual_seed(0)
    model = create_model("resnet18", dim=1, in_channels=1, num_classes=2, base_width=8, dcn_stages=(False,) * 4)
    task = ClassificationTask(model, num_classes=2, optimizer=functools.partial(torch.optim.AdamW, lr=3e-3))
    trainer = _trainer(max_epochs=4)
    trainer.fit(task, _loader(*_signals(256, 0), shuffle=True), _loader(*_signals(64, 1)))
    (results,) = trainer.test(task, _loader(*_signals(128, 2)), verbose=False)
    assert set(results) == {"test/loss", "test/accuracy", "test/macro_f1"}
    assert results["test/accuracy"] > 0.9 and results["test/macro_f1"] > 0.9


def test_segmentation_task_reports_dice_and_iou_and_improves():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(64, 1, 16, 16, generator=generator)
    targets = (images[:, 0] > 0.5).long() + (images[:, 0] < -0.5).long() * 2  # 3 classes, 0 background
    model = create_model("unet", dim=2, in_channels=1, num_classes=3, base_channels=8, depth=2)
    task = SegmentationTask(model, num_classes=3, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    trainer = _trainer(max_epochs=1)
    (before,) = trainer.test(task, _loader(images, targets), verbose=False)
    trainer = _trainer(max_epochs=8)
    trainer.fit(task, _loader(images, targets, shuffle=True))
    (after,) = trainer.test(task, _loader(images, targets), verbose=False)
    assert set(after) == {"test/loss", "test/dice", "test/iou"}
    assert after["test/loss"] < before["test/loss"]
    assert after["test/dice"] > 0.8 and after["test/iou"] > 0.6


def test_optimizer_and_scheduler_factories_are_used():
    model = nn.Sequential(nn.Flatten(), nn.Linear(32, 2))
    task = ClassificationTask(
        model,
        num_classes=2,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    trainer = _trainer(max_epochs=2)
    trainer.fit(task, _loader(*_signals(64, 0)))
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


def test_resume_takes_the_schedule_of_the_current_config():
    # A checkpoint at the end of a 2-epoch cosine (learning rate 0), resumed with T_max = 4: the
    # scheduler state and the learning rate become those of a 4-epoch run after 2 epochs.
    def task(epochs: int) -> ClassificationTask:
        cosine = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs)
        return ClassificationTask(nn.Linear(4, 2), 2, functools.partial(torch.optim.SGD, lr=0.1), cosine)

    saved = task(2).configure_optimizers()
    for _ in range(2):
        saved["optimizer"].step()
        saved["lr_scheduler"]["scheduler"].step()
    checkpoint = {
        "optimizer_states": [saved["optimizer"].state_dict()],
        "lr_schedulers": [saved["lr_scheduler"]["scheduler"].state_dict()],
    }
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    task(4).on_load_checkpoint(checkpoint)
    (state,), (optimizer,) = checkpoint["lr_schedulers"], checkpoint["optimizer_states"]
    assert state["T_max"] == 4 and state["last_epoch"] == 2
    assert optimizer["param_groups"][0]["lr"] == pytest.approx(0.05) == state["_last_lr"][0]
    # The same config gives back what was saved.
    unchanged = copy.deepcopy(checkpoint)
    task(4).on_load_checkpoint(unchanged)
    assert unchanged["lr_schedulers"][0] == state
    assert unchanged["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.05)


def test_default_optimizer_is_adamw():
    task = ClassificationTask(nn.Linear(4, 2), num_classes=2)
    assert isinstance(task.configure_optimizers(), torch.optim.AdamW)


def test_bf16_mixed_precision_runs_the_deformable_layers_in_bf16():
    model = create_model("resnet18", dim=2, in_channels=1, num_classes=2, base_width=8)
    seen = []
    model.layer4[0].conv2.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    task = ClassificationTask(model, num_classes=2)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    images = torch.randn(16, 1, 32, 32)
    trainer.fit(task, _loader(images, torch.randint(0, 2, (16,))))
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # AMP keeps fp32 master weights
