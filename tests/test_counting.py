import torch
from torch import nn

from autoprune.counting import count, human, layer_costs


def test_count_matches_a_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    cost = count(model, torch.zeros(1, 3, 16, 16))
    conv = 16 * 16 * 8 * 3 * 9          # output elements × input channels × kernel (no bias term)
    bn = 4 * 8 * 16 * 16                 # thop: 2 per element to normalise, doubled when affine
    pool = (16 * 16 + 1) * 8             # kernel adds plus one division per output
    linear = 8 * 4
    assert cost.flops == conv + bn + pool + linear
    assert cost.params == (8 * 3 * 9 + 8) + 2 * 8 + (8 * 4 + 4)


def test_count_leaves_no_thop_buffers_on_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    count(model, torch.zeros(1, 3, 8, 8))
    assert all("total_ops" not in dict(m.named_buffers()) for m in model.modules())
    assert set(model.state_dict()) == {"0.weight", "0.bias"}


def test_a_root_that_is_a_leaf_gets_its_params_counted():
    assert count(nn.Linear(4, 2), torch.zeros(1, 4)).params == 10


def test_layer_costs_add_up_to_the_total(tiny, example):
    per_layer = layer_costs(tiny, example)
    total = count(tiny, example)
    assert sum(c.flops for c in per_layer.values()) == total.flops
    assert sum(c.params for c in per_layer.values()) == total.params
    assert "block.conv1" in per_layer


def test_human():
    assert human(1_234_567) == "1.23M"
    assert human(12) == "12"
