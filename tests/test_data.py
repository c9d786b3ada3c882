"""Synthetic datasets and the datamodule: determinism, shapes, label ranges, real deformation, splits,
and that the 2D task is learnable by a small conv net but not by template matching."""

import pytest
import torch
from torch import Tensor, nn

from dcnlab.data import DeformedShapes2d, DeformedShapes3d, SyntheticDataModule, WarpedSignals

DATASETS = {1: WarpedSignals, 2: DeformedShapes2d, 3: DeformedShapes3d}
SIZES = {1: 64, 2: 24, 3: 12}
CASES = [(1, "classification"), (2, "classification"), (2, "segmentation"), (3, "classification"), (3, "segmentation")]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_dataset(dim: int, task: str, num_samples: int = 16, seed: int = 0, num_classes: int = 4):
    kwargs = {"task": task, "size": SIZES[dim]} if dim > 1 else {"length": SIZES[dim]}
    return DATASETS[dim](num_samples, num_classes=num_classes, seed=seed, **kwargs)


def stack(dataset, count: int | None = None) -> tuple[Tensor, Tensor]:
    inputs, targets = zip(*[dataset[i] for i in range(count or len(dataset))], strict=True)
    return torch.stack(inputs), torch.stack(targets)


@pytest.mark.parametrize("dim, task", CASES)
def test_same_seed_gives_identical_items_and_other_seed_different(dim, task):
    first, again, other = (make_dataset(dim, task, seed=seed) for seed in (3, 3, 4))
    for index in (0, 5, 15):
        assert torch.equal(first[index][0], again[index][0])
        assert torch.equal(first[index][1], again[index][1])
        assert not torch.equal(first[index][0], other[index][0])


def test_item_does_not_depend_on_access_order():
    dataset = make_dataset(2, "segmentation")
    late_first = dataset[7]
    [dataset[i] for i in range(7)]
    assert torch.equal(dataset[7][0], late_first[0]) and torch.equal(dataset[7][1], late_first[1])


@pytest.mark.parametrize("dim, task", CASES)
def test_items_have_documented_shapes_dtypes_and_normalisation(dim, task):
    dataset = make_dataset(dim, task)
    spatial = (SIZES[dim],) * dim
    inputs, targets = stack(dataset)
    assert inputs.shape == (16, 1, *spatial) and inputs.dtype == torch.float32
    assert torch.isfinite(inputs).all()
    assert inputs.mean().abs() < 0.1 and (inputs.std() - 1).abs() < 0.1
    expected_target = (16, *spatial) if task == "segmentation" else (16,)
    assert targets.shape == expected_target and targets.dtype == torch.int64


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_classification_labels_cover_every_class(dim):
    num_classes = 6
    _, labels = stack(make_dataset(dim, "classification", num_samples=300, num_classes=num_classes))
    assert labels.min() >= 0 and labels.max() < num_classes
    assert torch.bincount(labels, minlength=num_classes).min() > 0


@pytest.mark.parametrize("dim", [2, 3])
def test_segmentation_targets_hold_background_and_a_shape(dim):
    num_classes = 6
    dataset = make_dataset(dim, "segmentation", num_samples=200, num_classes=num_classes)
    _, targets = stack(dataset)
    assert targets.min() >= 0 and targets.max() <= num_classes
    flat = targets.flatten(1)
    assert (flat == 0).any(dim=1).all(), "every target has background"
    assert (flat > 0).any(dim=1).all(), "every target has at least one shape"
    assert set(targets.unique().tolist()) == set(range(num_classes + 1))


@pytest.mark.parametrize("dim, task", [(1, "classification"), (2, "classification"), (3, "classification")])
def test_samples_of_one_class_differ_beyond_noise(dim, task):
    # Items 0 and num_classes are both class 0; noise alone would leave them highly correlated.
    dataset = make_dataset(dim, task, num_samples=8, num_classes=4)
    (first, label_first), (second, label_second) = dataset[0], dataset[4]
    assert label_first == label_second == 0
    correlation = torch.corrcoef(torch.stack([first.flatten(), second.flatten()]))[0, 1]
    assert correlation < 0.9


def test_bad_dataset_arguments_raise_naming_the_argument():
    with pytest.raises(ValueError, match="num_classes"):
        DeformedShapes2d(4, num_classes=7)
    with pytest.raises(ValueError, match="task"):
        DeformedShapes3d(4, task="detection")
    with pytest.raises(ValueError, match="noise"):
        WarpedSignals(4, noise=-1.0)
    with pytest.raises(IndexError):
        WarpedSignals(4)[4]


@pytest.mark.parametrize("dim, task", CASES)
def test_datamodule_loaders_yield_batches_of_the_declared_shape(dim, task):
    datamodule = SyntheticDataModule(
        dim, task, size=SIZES[dim], train_samples=20, val_samples=12, test_samples=12, batch_size=8
    )
    spatial = (SIZES[dim],) * dim
    assert datamodule.in_channels == 1 and datamodule.dim == dim and datamodule.task == task
    assert datamodule.num_classes == (5 if task == "segmentation" else 4)
    for loader, count in ((datamodule.train_dataloader(), 20), (datamodule.val_dataloader(), 12)):
        batches = list(loader)
        assert sum(len(inputs) for inputs, _ in batches) == count
        inputs, targets = batches[0]
        assert inputs.shape == (8, 1, *spatial)
        assert targets.shape == ((8, *spatial) if task == "segmentation" else (8,))
        assert targets.max() < datamodule.num_classes


def test_datamodule_splits_differ_and_shuffle_is_seeded():
    def datamodule(seed: int) -> SyntheticDataModule:
        return SyntheticDataModule(
            2, size=16, train_samples=16, val_samples=16, test_samples=16, batch_size=16, seed=seed
        )

    first = datamodule(0)
    train, val, test = (stack(split)[0] for split in (first.train_set, first.val_set, first.test_set))
    assert not torch.equal(train, val) and not torch.equal(val, test) and not torch.equal(train, test)
    order = next(iter(first.train_dataloader()))[0]
    assert torch.equal(order, next(iter(datamodule(0).train_dataloader()))[0])
    assert not torch.equal(order, train), "train loader shuffles"
    assert not torch.equal(train, stack(datamodule(1).train_set)[0])


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"dim": 4}, "dim"),
        ({"dim": 1, "task": "segmentation"}, "task"),
        ({"dim": 2, "task": "detection"}, "task"),
        ({"dim": 2, "num_classes": 9}, "num_classes"),
        ({"dim": 2, "size": 0}, "size"),
        ({"dim": 2, "batch_size": 0}, "batch_size"),
        ({"dim": 3, "train_samples": -1}, "train_samples"),
        ({"dim": 3, "num_workers": -1}, "num_workers"),
    ],
)
def test_datamodule_rejects_bad_arguments_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        SyntheticDataModule(**kwargs)


def test_2d_task_is_learnable_by_a_small_convnet_but_not_by_template_matching():
    num_classes = 4
    train_inputs, train_labels = stack(DeformedShapes2d(512, num_classes=num_classes, seed=0))
    test_inputs, test_labels = stack(DeformedShapes2d(256, num_classes=num_classes, seed=1))

    # Nearest class mean in pixel space: what an undeformed task would be solved by.
    centroids = torch.stack([train_inputs[train_labels == k].mean(0) for k in range(num_classes)]).flatten(1)
    template_predictions = torch.cdist(test_inputs.flatten(1), centroids).argmin(1)
    template_accuracy = (template_predictions == test_labels).float().mean().item()

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        for batch in torch.randperm(len(train_inputs), generator=generator).split(16):
            loss = nn.functional.cross_entropy(net(train_inputs[batch]), train_labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (net(test_inputs).argmax(1) == test_labels).float().mean().item()

    assert torch.bincount(test_labels).tolist() == [256 // num_classes] * num_classes, "balanced: chance is 1/4"
    assert accuracy > 0.6, f"conv net accuracy {accuracy:.3f}"
    assert template_accuracy < 0.6, f"template matching accuracy {template_accuracy:.3f}: deformation too weak"
