import pytest
import torch

from autoprune.data import digits, load_data
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


def test_image_folder(tmp_path):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(10):
            Image.new("RGB", (20, 20), (i * 20, 0, 0)).save(tmp_path / label / f"{i}.png")
    data = load_data(str(tmp_path), image_size=16)
    assert data.num_classes == 2 and data.input_shape == (3, 16, 16)
    assert len(data.train) + len(data.val) + len(data.test) == 20
