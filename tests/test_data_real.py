"""Real-data modules on bundled (digits) or tiny tmp data; nothing is downloaded."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import open_dict
from PIL import Image

from dcnlab.data import (
    DigitsDataModule,
    ImageFolderDataModule,
    TorchvisionDataModule,
    UCRDataModule,
    VolumeFolderDataModule,
)
from dcnlab.runner import train


def _ids(dataset) -> set[int]:
    return set(dataset.indices)


def _all_inputs(loader) -> torch.Tensor:
    return torch.cat([inputs for inputs, _ in loader])


def _check_batch(module, shape: tuple[int, ...]) -> None:
    inputs, targets = next(iter(module.train_dataloader()))
    assert inputs.dtype == torch.float32 and inputs.shape[1:] == shape
    assert targets.dtype == torch.int64 and targets.shape == inputs.shape[:1]
    assert 0 <= targets.min() and targets.max() < module.num_classes
    assert module.task == "classification" and module.dim == len(shape) - 1 and module.in_channels == shape[0]


# ---------------------------------------------------------------------------------------------- digits


def test_digits_shapes_and_deterministic_disjoint_splits():
    module = DigitsDataModule(size=16, batch_size=32, seed=3)
    _check_batch(module, (1, 16, 16))
    assert module.num_classes == 10
    sizes = [len(module.train_set), len(module.val_set), len(module.test_set)]
    assert sum(sizes) == 1797 and sizes[1] == sizes[2] == round(1797 * 0.15)
    splits = [set(module.indices[split]) for split in ("train", "val", "test")]
    assert len(set.union(*splits)) == 1797 and sum(map(len, splits)) == 1797
    again = DigitsDataModule(size=16, batch_size=32, seed=3)
    assert again.indices == module.indices
    assert torch.equal(module.val_set.tensors[0], again.val_set.tensors[0])
    other = DigitsDataModule(size=16, batch_size=32, seed=4)
    assert not torch.equal(module.val_set.tensors[0], other.val_set.tensors[0])
    # Shuffled with a seeded generator: two loaders of one module give the same order.
    first, second = _all_inputs(module.train_dataloader()), _all_inputs(module.train_dataloader())
    assert torch.equal(first, second) and not torch.equal(first, module.train_set.tensors[0])
    assert abs(module.train_set.tensors[0].mean().item()) < 1e-4


def test_digits_split_indices_are_disjoint_and_cover_everything():
    from dcnlab.data.real import split_indices

    val, test, train_ = split_indices(1797, (0.15, 0.15), seed=0, what="x")
    assert set(val).isdisjoint(test) and set(train_).isdisjoint(set(val) | set(test))
    assert sorted(val + test + train_) == list(range(1797))
    assert split_indices(1797, (0.15, 0.15), seed=0, what="x") == [val, test, train_]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"size": 4}, "size"), ({"val_fraction": 0.0}, "val_fraction"), ({"batch_size": 0}, "batch_size")],
)
def test_digits_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        DigitsDataModule(**kwargs)


# ---------------------------------------------------------------------------------------------- mnist/cifar10


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_torchvision_without_files_or_download_names_root_and_download(name, tmp_path):
    module = TorchvisionDataModule(name, root=str(tmp_path), download=False)
    assert module.in_channels == (1 if name == "mnist" else 3) and module.num_classes == 10 and module.dim == 2
    with pytest.raises(FileNotFoundError, match=r"^root: .*download=true"):
        module.setup("fit")
    with pytest.raises(FileNotFoundError, match=r"^root: .*download=true"):
        module.train_dataloader()


def test_torchvision_bad_name():
    with pytest.raises(ValueError, match="^name:"):
        TorchvisionDataModule("imagenet", root="x")


# ---------------------------------------------------------------------------------------------- image folder


def _image_folder(root: Path, per_class: int = 5) -> Path:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    # A grayscale image: ImageFolder's loader converts it to RGB.
    Image.fromarray(rng.integers(0, 256, size=(9, 9), dtype=np.uint8)).save(root / "dog" / "gray.png")
    return root


def test_image_folder_shapes_classes_and_splits(tmp_path):
    root = _image_folder(tmp_path / "images")
    module = ImageFolderDataModule(str(root), size=16, val_fraction=0.2, test_fraction=0.2, batch_size=4, seed=1)
    _check_batch(module, (3, 16, 16))
    assert module.classes == ["cat", "dog"] and module.num_classes == 2
    splits = [_ids(module.train_set), _ids(module.val_set), _ids(module.test_set)]
    assert sum(map(len, splits)) == 11 and len(set.union(*splits)) == 11
    again = ImageFolderDataModule(str(root), size=16, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert _ids(again.val_set) == splits[1] and _ids(again.test_set) == splits[2]


def test_image_folder_missing_and_empty_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^root: no folder at .*data\.root="):
        ImageFolderDataModule(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="^root:"):
        ImageFolderDataModule(str(tmp_path))


# ---------------------------------------------------------------------------------------------- volumes


def _volume_folder(root: Path, channels: int | None = None) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shape = (6, 8, 8) if channels is None else (channels, 6, 8, 8)
    rows = ["file,label"]
    for i in range(10):
        np.save(root / f"v{i}.npy", rng.normal(5.0, 3.0, size=shape).astype(np.float32))
        rows.append(f"v{i}.npy,{'tumour' if i % 2 else 'healthy'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize("channels", [None, 2])
def test_volume_folder_shapes_string_labels_and_splits(tmp_path, channels):
    module = VolumeFolderDataModule(str(_volume_folder(tmp_path / "vols", channels)), batch_size=4, seed=2)
    _check_batch(module, (channels or 1, 6, 8, 8))
    assert module.classes == ["healthy", "tumour"] and module.num_classes == 2
    splits = [_ids(module.train_set), _ids(module.val_set), _ids(module.test_set)]
    assert sum(map(len, splits)) == 10 and len(set.union(*splits)) == 10
    volume, label = module.train_set[0]
    assert abs(volume.mean().item()) < 1e-4 and label.dtype == torch.int64


def test_volume_folder_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="^root: no folder at"):
        VolumeFolderDataModule(str(tmp_path / "missing"))
    root = _volume_folder(tmp_path / "vols")
    with pytest.raises(FileNotFoundError, match="^labels_csv: no file at"):
        VolumeFolderDataModule(str(root), labels_csv="other.csv")
    (root / "v3.npy").unlink()
    with pytest.raises(FileNotFoundError, match="^labels_csv: .*v3.npy"):
        VolumeFolderDataModule(str(root))


# ---------------------------------------------------------------------------------------------- UCR


def _ucr(root: Path, name: str = "Toy") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def rows(count: int) -> str:
        lines = []
        for i in range(count):
            label = ["-1", "1", "abc"][i % 3]  # an int pair and a string: sorted as strings, all -> 0..2
            length = 12 if i % 4 else 9  # every fourth series is shorter, NaN-padded to 12
            values = [f"{v:.4f}" for v in rng.normal(2.0, 4.0, size=length)] + ["NaN"] * (12 - length)
            lines.append("\t".join([label, *values]))
        return "\n".join(lines) + "\n"

    (folder / f"{name}_TRAIN.tsv").write_text(rows(15))
    (folder / f"{name}_TEST.tsv").write_text(rows(6))
    return root


def test_ucr_shapes_labels_nan_padding_and_normalisation(tmp_path):
    module = UCRDataModule(str(_ucr(tmp_path)), "Toy", val_fraction=0.2, batch_size=4, seed=0)
    _check_batch(module, (1, 12))
    assert module.classes == ["-1", "1", "abc"] and module.num_classes == 3
    assert len(module.train_set) == 12 and len(module.val_set) == 3 and len(module.test_set) == 6
    inputs = torch.cat([module.train_set.tensors[0], module.val_set.tensors[0], module.test_set.tensors[0]])
    assert not inputs.isnan().any()
    test_inputs = module.test_set.tensors[0][:, 0]
    # Test row 0 is short (9 values): its padding is 0 and its 9 values are z-normalised.
    assert torch.all(test_inputs[0, 9:] == 0)
    assert test_inputs[0, :9].mean().abs() < 1e-5 and math.isclose(
        test_inputs[0, :9].std(unbiased=False), 1, rel_tol=1e-4
    )
    assert test_inputs[1].mean().abs() < 1e-5
    assert module.test_set.tensors[1].tolist() == [0, 1, 2, 0, 1, 2]


def test_ucr_int_labels_sort_numerically(tmp_path):
    folder = tmp_path / "Ints"
    folder.mkdir()
    for split in ("TRAIN", "TEST"):
        lines = [f"{label}\t1.0\t2.0\t{i}.5" for i, label in enumerate([10, 2, 10, 2, 10, 2, 2, 10, 10, 2])]
        (folder / f"Ints_{split}.tsv").write_text("\n".join(lines) + "\n")
    module = UCRDataModule(str(tmp_path), "Ints", val_fraction=0.2)
    assert module.classes == ["2", "10"] and module.test_set.tensors[1][:2].tolist() == [1, 0]


def test_ucr_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="^root: no folder at"):
        UCRDataModule(str(tmp_path / "missing"), "Toy")
    with pytest.raises(FileNotFoundError, match="^name: no file at .*Other_TRAIN.tsv"):
        UCRDataModule(str(_ucr(tmp_path)), "Other")


# ---------------------------------------------------------------------------------------------- configs


def _compose(overrides: list[str]):
    with initialize_config_module(version_base="1.3", config_module="dcnlab.conf"):
        return compose("train", overrides=overrides)


def test_each_data_config_instantiates_its_class(tmp_path):
    images, vols, ucr = _image_folder(tmp_path / "images"), _volume_folder(tmp_path / "vols"), _ucr(tmp_path / "ucr")
    cases = {
        "digits": ([], DigitsDataModule),
        "mnist": ([f"data.root={tmp_path}"], TorchvisionDataModule),
        "cifar10": ([f"data.root={tmp_path}"], TorchvisionDataModule),
        "image_folder": ([f"data.root={images}"], ImageFolderDataModule),
        "volumes": ([f"data.root={vols}"], VolumeFolderDataModule),
        "ucr": ([f"data.root={ucr}", "data.name=Toy"], UCRDataModule),
    }
    for data, (overrides, cls) in cases.items():
        module = instantiate(_compose([f"data={data}", "seed=5", *overrides]).data)
        assert type(module) is cls and module.seed == 5, data
    assert instantiate(_compose(["data=cifar10", f"data.root={tmp_path}"]).data).in_channels == 3


def test_train_on_digits_end_to_end(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = _compose(["data=digits", "model.base_width=4", "+trainer.fast_dev_run=true"])
        with open_dict(config):
            config.paths.output_dir = str(tmp_path)
        metrics = train(config)
    finally:
        torch.set_num_threads(threads)
    assert "test/accuracy" in metrics
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
