"""The loader backends: one order, identical batches, and clear errors for missing extras."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from engine.data.loaders import LOADER_NAMES, TensorLoader, epoch_order, make_loader
from engine.data.splits import to_float
from engine.errors import UsageError

BATCH = 64


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


needs_ffcv = pytest.mark.skipif(
    not _installed("ffcv"), reason="FFCV is not installed (pip install -e '.[ffcv]', needs pkg-config, OpenCV, libturbojpeg)"
)
needs_dali = pytest.mark.skipif(
    not _installed("nvidia.dali"), reason="DALI is not installed (pip install -e '.[dali]')"
)


@pytest.fixture(scope="module")
def training_set() -> tuple[torch.Tensor, torch.Tensor]:
    # 200 images: three full batches of 64 and a last batch of 8.
    generator = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (200,), generator=generator)
    return images, labels


def epochs_of(loader, seed: int = 3, epochs: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(x.clone(), y.clone()) for _ in range(epochs) for x, y in loader.epoch(generator)]


def expected_batches(images, labels, seed: int = 3, epochs: int = 2, batch: int = BATCH):
    """The batches every loader must yield: randperm per epoch, to_float of the images."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), batch):
            index = order[start : start + batch]
            out.append((to_float(images[index]), labels[index]))
    return out


def assert_same_batches(actual, expected, backend: str) -> None:
    assert len(actual) == len(expected), f"{backend}: {len(actual)} batches, expected {len(expected)}"
    for i, ((x, y), (x_ref, y_ref)) in enumerate(zip(actual, expected)):
        assert x.dtype == torch.float32, f"{backend} batch {i}: dtype {x.dtype}"
        assert torch.equal(x, x_ref), f"{backend} batch {i}: images differ from the tensor loader's"
        assert torch.equal(y, y_ref), f"{backend} batch {i}: labels differ from the tensor loader's"


def test_tensor_loader_matches_randperm_order(training_set):
    images, labels = training_set
    batches = epochs_of(TensorLoader(images, labels, BATCH))
    assert_same_batches(batches, expected_batches(images, labels), "tensor")
    assert [len(y) for _, y in batches[:4]] == [64, 64, 64, 8]


def test_tensor_loader_pixel_range(training_set):
    images, labels = training_set
    x, _ = next(TensorLoader(images, labels, BATCH).epoch(torch.Generator().manual_seed(0)))
    assert x.min() >= -1.0
    assert x.max() <= 1.0


def test_epoch_order_is_device_independent():
    a = epoch_order(50, torch.Generator().manual_seed(1))
    b = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_member_epochs_one_gather(training_set):
    images, labels = training_set
    loader = TensorLoader(images, labels, BATCH)
    seeds = (3, 4, 5)
    fused = list(loader.member_epochs([torch.Generator().manual_seed(s) for s in seeds]))
    for g, seed in enumerate(seeds):
        alone = list(loader.epoch(torch.Generator().manual_seed(seed)))
        assert len(alone) == len(fused)
        for (x, y), (xs, ys) in zip(alone, fused):
            assert xs.shape == (len(seeds),) + x.shape
            assert torch.equal(xs[g], x), f"member {g}: images differ from its own epoch"
            assert torch.equal(ys[g], y), f"member {g}: labels differ from its own epoch"


def test_channels_last_layout(training_set):
    images, labels = training_set
    loader = make_loader("tensor", images, labels, BATCH, channels_last=True)
    x, _ = next(loader.epoch(torch.Generator().manual_seed(0)))
    assert x.is_contiguous(memory_format=torch.channels_last)
    plain, _ = next(make_loader("tensor", images, labels, BATCH).epoch(torch.Generator().manual_seed(0)))
    assert torch.equal(x, plain)
    # Every batch of two epochs, the smaller last one included, in both respects.
    batches = epochs_of(loader)
    assert_same_batches(batches, expected_batches(images, labels), "tensor, channels_last")
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in batches)


def test_unknown_loader_lists_choices(training_set):
    with pytest.raises(UsageError, match="choose from tensor, ffcv, dali"):
        make_loader("webdataset", *training_set, BATCH)


def test_rejects_float_images(training_set):
    images, labels = training_set
    with pytest.raises(ValueError, match="uint8"):
        make_loader("tensor", images.float(), labels, BATCH)


def test_missing_ffcv_names_extra_and_system_packages(training_set, monkeypatch):
    monkeypatch.setitem(sys.modules, "ffcv", None)
    monkeypatch.setitem(sys.modules, "ffcv.fields", None)
    with pytest.raises(UsageError) as error:
        make_loader("ffcv", *training_set, BATCH)
    message = str(error.value)
    assert "pip install -e '.[ffcv]'" in message
    assert "pkg-config" in message
    assert "libopencv-dev" in message
    assert "libturbojpeg0-dev" in message


def test_missing_dali_names_extra(training_set, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    monkeypatch.setitem(sys.modules, "nvidia.dali.fn", None)
    with pytest.raises(UsageError, match=r"pip install -e '\.\[dali\]'"):
        make_loader("dali", *training_set, BATCH)


@needs_dali
def test_dali_matches_tensor_loader(training_set):
    images, labels = training_set
    loader = make_loader("dali", images, labels, BATCH)
    assert_same_batches(epochs_of(loader), expected_batches(images, labels), "dali")
    loader.close()


@needs_dali
def test_dali_every_pixel_value():
    # All 256 pixel values, so DALI's arithmetic is checked against to_float on each.
    images = torch.arange(256, dtype=torch.uint8).repeat(12).reshape(1, 3, 32, 32).repeat(3, 1, 1, 1)
    labels = torch.arange(3)
    batches = epochs_of(make_loader("dali", images, labels, 2), epochs=1)
    assert_same_batches(batches, expected_batches(images, labels, epochs=1, batch=2), "dali")


@needs_dali
def test_dali_rejects_flat_images():
    images = torch.zeros((4, 3072), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"reads images \[n, C, H, W\], got shape \(4, 3072\)"):
        make_loader("dali", images, torch.zeros(4, dtype=torch.int64), 2)


@needs_ffcv
def test_ffcv_matches_tensor_loader(training_set, tmp_path):
    images, labels = training_set
    threads = torch.get_num_threads()
    loader = make_loader("ffcv", images, labels, BATCH, cache_dir=str(tmp_path))
    assert_same_batches(epochs_of(loader), expected_batches(images, labels), "ffcv")
    assert torch.get_num_threads() == threads, "FFCV changed PyTorch's thread count"
    betons = list(tmp_path.glob("*.beton"))
    assert len(betons) == 1, f"expected one .beton file, found {betons}"
    assert not list(tmp_path.glob("*.partial")), "a partial file was left behind"

    # The same images with other labels (an N2 of the same D2) reuse the file.
    from engine.data.ffcv_loader import write_beton

    written = betons[0].stat().st_mtime_ns
    assert write_beton(images.numpy(), tmp_path) == betons[0]
    assert betons[0].stat().st_mtime_ns == written


@needs_ffcv
def test_ffcv_writes_without_progress_bar(training_set, tmp_path, capfd):
    from engine.data.ffcv_loader import import_ffcv, write_beton

    import_ffcv()
    capfd.readouterr()
    write_beton(training_set[0].numpy(), tmp_path)
    written = capfd.readouterr()
    assert "it/s" not in written.err, f"FFCV drew a progress bar: {written.err[-200:]!r}"
    assert "%|" not in written.err


def test_loader_names():
    assert LOADER_NAMES == ("tensor", "ffcv", "dali")
