"""The paper's few-shot classifiers: shapes, the head(features(x)) split, no redundant biases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mamlbench.models.conv import MODELS, Conv4, FCNet, build_model


@pytest.mark.parametrize("name, shape, n_features", [
    ("conv4_omniglot", (1, 28, 28), 64),       # 28 -> 14 -> 7 -> 4 -> 2, mean over the 2x2
    ("conv4_miniimagenet", (3, 84, 84), 800),  # 84 -> 42 -> 21 -> 10 -> 5: 5 * 5 * 32
    ("mlp_omniglot", (1, 28, 28), 64),
])
def test_shapes_and_split(name, shape, n_features):
    torch.manual_seed(0)
    model = build_model(name, n_way=5)
    x = torch.randn(4, *shape)
    feats = model.features(x)
    assert feats.shape == (4, n_features)
    torch.testing.assert_close(model(x), model.head(feats))
    assert model(x).shape == (4, 5)


def test_paper_architectures():
    omniglot = build_model("conv4_omniglot", n_way=20)
    convs = [m for m in omniglot.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.stride, c.kernel_size) for c in convs] == [(64, (2, 2), (3, 3))] * 4
    assert not any(isinstance(m, nn.MaxPool2d) for m in omniglot.modules())
    mini = build_model("conv4_miniimagenet", n_way=5)
    assert [c.out_channels for c in mini.modules() if isinstance(c, nn.Conv2d)] == [32] * 4
    assert sum(isinstance(m, nn.MaxPool2d) for m in mini.modules()) == 4
    mlp = build_model("mlp_omniglot", n_way=5)
    assert [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)] == [256, 128, 64, 64, 5]


@pytest.mark.parametrize("name", [n for n in MODELS if "reptile" not in n and "mamlpp" not in n])  # the Reptile and MAML++ references keep their conv biases
def test_no_bias_before_batch_norm(name):
    model = build_model(name, n_way=5)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm))]
    for layer, nxt in zip(layers, layers[1:]):
        if isinstance(nxt, nn.modules.batchnorm._BatchNorm):
            assert layer.bias is None, f"{layer} feeds a BatchNorm but has a bias"
    assert model.head.bias is not None  # the head's bias is not followed by a normalisation


def test_channels_last_same_function():
    torch.manual_seed(0)
    plain = Conv4(1, 5, hidden=8)
    nhwc = Conv4(1, 5, hidden=8, channels_last=True)
    nhwc.load_state_dict(plain.state_dict())
    x = torch.randn(6, 1, 28, 28)
    torch.testing.assert_close(nhwc(x), plain(x), rtol=1e-5, atol=1e-5)


def test_build_model_errors_and_overrides():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet", n_way=5)
    small = build_model("conv4_omniglot", n_way=3, image_size=8, hidden=4)
    assert small(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert isinstance(build_model("mlp_omniglot", 5, hidden=[16]), FCNet)
    with pytest.raises(ValueError, match="too small"):
        Conv4(3, 5, downsample="maxpool", pool="flatten", image_size=8)


@pytest.mark.parametrize("side", [8, 7])
def test_omniglot_conv_pads_as_tensorflow_same(side):
    """TF's 'SAME' at stride 2 (the original's conv_block): out = ceil(n / 2), total padding
    (out - 1) * 2 + 3 - n, the odd pixel after: on an even map nothing before, one after. Computed
    here by hand, output[i, j] = sum over a, b of w[a, b] * x[2i + a - before, 2j + b - before]."""
    from mamlbench.models.conv import build_model
    conv = build_model("conv4_omniglot", 5).features[0][0]
    g = torch.Generator().manual_seed(side)
    x = torch.randn(1, 1, side, side, generator=g, dtype=torch.float64)
    w = torch.randn(1, 1, 3, 3, generator=g, dtype=torch.float64)
    conv = conv.double()
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:1] = w
    out = -(-side // 2)
    before = ((out - 1) * 2 + 3 - side) // 2
    expected = np.zeros((out, out))
    xs, ws = x[0, 0].numpy(), w[0, 0].numpy()
    for i in range(out):
        for j in range(out):
            for a in range(3):
                for b in range(3):
                    r, c = 2 * i + a - before, 2 * j + b - before
                    if 0 <= r < side and 0 <= c < side:
                        expected[i, j] += ws[a, b] * xs[r, c]
    got = conv(x)[0, 0].detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    symmetric = torch.nn.functional.conv2d(x, w, stride=2, padding=1)[0, 0].numpy()
    assert (side % 2 == 1) == np.allclose(symmetric, expected)   # PyTorch's padding=1 differs on even maps
