import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import autoprune.inputs.data as data_module
from autoprune.inputs.data import _split, digits, load_data
from autoprune.errors import AutopruneError


def indices(subset):
    return set(subset.indices)


def test_digits_splits_are_deterministic_and_disjoint(digits_data):
    again = digits(seed=0)
    assert indices(again.test) == indices(digits_data.test)
    assert indices(again.val) == indices(digits_data.val)
    # val is carved from the training part; test is held apart from both
    train_ids = {digits_data.train.dataset.indices[i] for i in digits_data.train.indices}
    val_ids = {digits_data.val.dataset.indices[i] for i in digits_data.val.indices}
    test_ids = indices(digits_data.test)
    assert not (train_ids & val_ids) and not (train_ids & test_ids) and not (val_ids & test_ids)
    assert len(train_ids) + len(val_ids) + len(test_ids) == 1797
    image, label = digits_data.train[0]
    assert image.shape == (3, 32, 32) and digits_data.num_classes == 10 and 0 <= int(label) < 10


def test_loader_batches(digits_data):
    inputs, targets = next(iter(digits_data.loader("train", batch_size=8, shuffle=True)))
    assert inputs.shape == (8, 3, 32, 32) and targets.dtype == torch.long


def test_unknown_data_set_lists_the_choices():
    with pytest.raises(AutopruneError, match="unknown data set 'imagenet3'.*digits"):
        load_data("imagenet3")


def test_missing_torchvision_data_asks_for_download(tmp_path):
    with pytest.raises(AutopruneError, match="--download"):
        load_data("cifar10", data_dir=tmp_path)


def test_data_factory_from_a_file(tmp_path):
    source = tmp_path / "mydata.py"
    source.write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def make():\n"
        "    x = torch.randn(40, 3, 8, 8); y = torch.arange(40) % 4\n"
        "    return TensorDataset(x[:20], y[:20]), TensorDataset(x[20:30], y[20:30]), TensorDataset(x[30:], y[30:])\n"
    )
    data = load_data(f"{source}:make")
    assert data.num_classes == 4 and data.input_shape == (3, 8, 8)
    with pytest.raises(AutopruneError, match="no callable 'nothing'"):
        load_data(f"{source}:nothing")


def test_a_data_factory_that_raises_is_one_line_naming_it(tmp_path):
    source = tmp_path / "mydata.py"
    source.write_text("def make():\n    raise ValueError('no files\\nhere')\n")
    with pytest.raises(AutopruneError, match=r"data factory .*mydata.py:make raised ValueError: no files here") as err:
        load_data(f"{source}:make")
    assert "\n" not in str(err.value)


def test_image_folder(tmp_path):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(10):
            Image.new("RGB", (20, 20), (i * 20, 0, 0)).save(tmp_path / label / f"{i}.png")
    data = load_data(str(tmp_path), image_size=16)
    assert data.num_classes == 2 and data.input_shape == (3, 16, 16)
    assert len(data.train) + len(data.val) + len(data.test) == 20


# --- MNIST / Fashion-MNIST from idx files -------------------------------------------------------

FMNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, gz: bool = False) -> None:
    """An idx file as the MNIST site ships it: big-endian magic and uint32 dims, then uint8 data."""
    magic = magic if magic is not None else 0x800 | array.ndim
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def write_set(folder: Path, gz: bool = False, train: int = 20, test: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", train), ("t10k", test)):
        arrays[f"{split}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}-labels-idx1-ubyte"] = (np.arange(n) % 10).astype(np.uint8)
    for stem, array in arrays.items():
        write_idx(folder / stem, array, gz=gz)
    return arrays


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    """Pretend Debian's dataset-fashion-mnist is not installed."""
    monkeypatch.setitem(data_module.IDX_SYSTEM, "fashion-mnist", tmp_path / "not-installed")


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("layout", ["", "FashionMNIST/raw"], ids=["flat", "torchvision"])
def test_idx_files_decode_like_torchvision(tmp_path, gz, layout):
    from PIL import Image
    from torchvision import transforms

    arrays = write_set(tmp_path / layout, gz=gz)
    data = load_data("fashion-mnist", data_dir=tmp_path, seed=3)
    assert (len(data.train), len(data.val), len(data.test)) == (18, 2, 5)
    assert data.name == "fashion-mnist" and data.num_classes == 10 and data.input_shape == (3, 32, 32)
    assert data.test.targets.tolist() == [0, 1, 2, 3, 4] and data.test.targets.dtype == torch.long
    # what the model sees matches the old PIL path: Resize(32), three channels, mean 0.5, std 0.25
    old = transforms.Compose([transforms.Resize(32), transforms.Grayscale(3), transforms.ToTensor(),
                              transforms.Normalize([0.5] * 3, [0.25] * 3)])
    for i in range(5):
        image, label = data.test[i]
        expected = old(Image.fromarray(arrays["t10k-images-idx3-ubyte"][i], mode="L"))
        assert image.shape == (3, 32, 32) and int(label) == i
        assert torch.allclose(image, expected, atol=1.01 / 255 / 0.25)  # PIL rounds to whole grey levels
    inputs, targets = next(iter(data.loader("train", batch_size=4, shuffle=True)))
    assert inputs.shape == (4, 3, 32, 32) and targets.dtype == torch.long


def test_constant_image_normalises_exactly(tmp_path):
    write_set(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.full((5, 28, 28), 204, np.uint8))
    image, _ = load_data("fashion-mnist", data_dir=tmp_path).test[0]
    assert torch.allclose(image, torch.full((3, 32, 32), (204 / 255 - 0.5) / 0.25))


def test_missing_fashion_mnist_names_the_package_and_options(tmp_path, no_debian):
    with pytest.raises(AutopruneError, match="dataset-fashion-mnist.*--data-dir.*--download"):
        load_data("fashion-mnist", data_dir=tmp_path)
    with pytest.raises(AutopruneError, match="mnist is not in .*MNIST/raw/.*--data-dir.*--download") as err:
        load_data("mnist", data_dir=tmp_path)
    assert "apt-get" not in str(err.value)  # Debian packages no MNIST


def test_download_goes_through_torchvision_into_data_dir(tmp_path, monkeypatch):
    import torchvision.datasets

    class FakeMNIST:  # stands in for the network: writes what torchvision's downloader would
        def __init__(self, root, train, download):
            assert download and not train
            write_set(Path(root) / "MNIST" / "raw", train=10, test=3)

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    data = load_data("mnist", data_dir=tmp_path, download=True)
    assert data.name == "mnist" and (len(data.train), len(data.val), len(data.test)) == (9, 1, 3)


@pytest.mark.parametrize("damage", ["magic", "short", "gzip"])
def test_corrupt_idx_file_is_one_clear_error(tmp_path, damage):
    write_set(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    if damage == "magic":  # a labels file where the images should be
        write_idx(images, np.zeros((20, 28, 28)), magic=0x801)
        expected = r"train-images-idx3-ubyte is not an idx3 file \(magic 0x00000801, expected 0x00000803\)"
    elif damage == "short":
        images.write_bytes(images.read_bytes()[:-100])
        expected = "train-images-idx3-ubyte holds 15580 bytes of data but its header says 20×28×28"
    else:
        images.unlink()
        (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
        expected = r"train-images-idx3-ubyte.gz cannot be read \(Unknown compression method\)"
    with pytest.raises(AutopruneError, match=expected):
        load_data("fashion-mnist", data_dir=tmp_path)


@pytest.fixture(scope="module")
def fashion_mnist():
    if not (FMNIST_DEBIAN / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{FMNIST_DEBIAN} is absent: apt-get install dataset-fashion-mnist")
    return load_data("fashion-mnist", data_dir="/nonexistent", seed=0)


def test_debian_fashion_mnist(fashion_mnist):
    data = fashion_mnist
    assert (len(data.train), len(data.val), len(data.test)) == (54000, 6000, 10000)
    assert data.num_classes == 10 and data.input_shape == (3, 32, 32)
    image, label = data.train[0]
    assert image.shape == (3, 32, 32) and 0 <= int(label) < 10
    assert data.test.targets.bincount().tolist() == [1000] * 10  # the t10k split is balanced
    full = data.train.dataset
    assert full.images.shape == (60000, 1, 32, 32)  # stored once, one channel
    # deterministic for a seed: the split is a function of (60,000, seed) alone
    again_train, again_val = _split(full, 0.1, 0)
    assert again_val.indices == data.val.indices and again_train.indices == data.train.indices
    assert _split(full, 0.1, 1)[1].indices != data.val.indices
