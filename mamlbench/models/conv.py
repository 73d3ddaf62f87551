"""The few-shot classifiers of the MAML paper: conv4 for Omniglot and mini-ImageNet, and the "no conv" MLP.

Every model is `head(features(x))`: `features` maps images to a flat embedding, `head` is one
`nn.Linear` to the `n_way` logits. ANIL relies on that split to embed a task's support set once.

Choices, checked against the original TensorFlow code (cbfinn/maml, `maml.py`):
- Omniglot conv4: 4 x [3x3 conv, 64 filters, stride 2, TF 'SAME' padding, BatchNorm, ReLU], then the *mean* over the
  remaining 2x2 positions (the original's `tf.reduce_mean(hidden4, [1, 2])`), then a linear head.
- mini-ImageNet conv4: 4 x [3x3 conv (padding 1), 32 filters, BatchNorm, ReLU, 2x2 max-pool], then
  the 5x5x32 = 800 features flattened, then a linear head.
- "MAML, no conv" (Omniglot): 784 -> 256 -> 128 -> 64 -> 64 -> n_way, each hidden layer
  Linear -> BatchNorm -> ReLU as in the original `forward_fc`.
- No bias on a convolution or linear layer that feeds a BatchNorm: the normalisation subtracts
  it again, so it is redundant and its gradient is exactly zero under batch statistics.
- BatchNorm keeps no running statistics (`track_running_stats=False`): the core normalises every
  forward with the statistics of the batch it sees, as the original did (`is_training` always on),
  so buffers would only be written and never read. MAML++ swaps in its own per-step layers.
- BatchNorm, as the original's `tf.contrib.layers.batch_norm` (TF defaults `center=True`,
  `scale=False`, `epsilon=0.001`): a learned shift, no scale, eps 1e-3 (`norm="shift"`); `norm="affine"`
  learns a scale too (PyTorch's default, and what MAML++'s per-step weights refine). The shift-only
  scale is a frozen parameter of ones, so every algorithm passes it through unchanged.
- Initial weights (`init="reference"`, the original's `construct_conv_weights`/`construct_fc_weights`):
  Xavier-uniform convolutions, the Omniglot head N(0, 1), the mini-ImageNet head Xavier-uniform, the
  MLP's layers N(0, 0.01) truncated at 2 std, every bias 0; `init="torch"` keeps PyTorch's defaults.

References: Finn, Abbeel & Levine, ICML 2017 (section 5.2 and the released code); Vinyals et al.,
"Matching Networks for One Shot Learning", NeurIPS 2016 (the conv4 embedding).
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


Norm = Literal["shift", "affine"]
Init = Literal["reference", "torch"]


def batch_norm(kind: type, channels: int, norm: Norm, eps: float) -> nn.modules.batchnorm._BatchNorm:
    """BatchNorm without running statistics; `norm="shift"` freezes the scale at 1 (no scale learned)."""
    if norm not in ("shift", "affine"):
        raise ValueError(f"norm must be shift or affine, got {norm!r}")
    layer = kind(channels, eps=eps, track_running_stats=False)
    if norm == "shift":
        layer.weight.requires_grad_(False)
    return layer


def truncated_normal_(tensor: Tensor, std: float) -> Tensor:
    """TF's `truncated_normal`: N(0, std) redrawn outside 2 std."""
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


class ConvBlock(nn.Sequential):
    """3x3 conv (no bias) -> BatchNorm -> ReLU, downsampled by stride 2 or by a 2x2 max-pool.

    The original pads as TF's 'SAME' (maml utils.py:33): at stride 2 on an even map that is no pixel
    before and one after, which `SameConv2d` does; PyTorch's symmetric padding=1 would sample a grid
    shifted by one pixel. At stride 1 'SAME' is padding=1."""

    def __init__(self, in_channels: int, out_channels: int, downsample: Literal["stride", "maxpool"],
                 norm: Norm = "affine", norm_eps: float = 1e-5):
        conv = (SameConv2d(in_channels, out_channels, 3, stride=2, bias=False) if downsample == "stride"
                else nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False))
        layers: list[nn.Module] = [
            conv,
            batch_norm(nn.BatchNorm2d, out_channels, norm, norm_eps),
            nn.ReLU(),
        ]
        if downsample == "maxpool":
            layers.append(nn.MaxPool2d(2))
        super().__init__(*layers)


def _downsampled(size: int, downsample: str, times: int = 4) -> int:
    for _ in range(times):
        size = (size + 1) // 2 if downsample == "stride" else size // 2  # ceil for stride 2 / pad 1
    return size


class Conv4(nn.Module):
    """Four conv blocks and a linear head: the conv4 of MAML and Matching Networks.

    Args:
        in_channels: image channels (1 for Omniglot, 3 for mini-ImageNet).
        n_way: classes per task: the head's outputs.
        hidden: filters per conv layer (64 for Omniglot, 32 for mini-ImageNet in the paper).
        downsample: "stride" (Omniglot, as the original code) or "maxpool" (mini-ImageNet).
        pool: "mean" averages the last feature map over positions (Omniglot, as the original);
            "flatten" keeps every position (mini-ImageNet: 5x5xhidden features).
        image_size: side of the square input; only needed for "flatten".
        channels_last: run the convolutions in NHWC memory format (the input is converted).
        norm, norm_eps: BatchNorm's learned parameters ("shift" or "affine") and epsilon.
        init: "reference" (the original code's, see the module docstring) or "torch".

    Example:
        model = Conv4(1, n_way=5)             # Omniglot: x of shape (N, 1, 28, 28)
        logits = model(torch.randn(25, 1, 28, 28))   # (25, 5)
    """

    def __init__(self, in_channels: int, n_way: int, hidden: int = 64,
                 downsample: Literal["stride", "maxpool"] = "stride",
                 pool: Literal["mean", "flatten"] = "mean", image_size: int = 28,
                 channels_last: bool = False, norm: Norm = "affine", norm_eps: float = 1e-5, init: Init = "torch"):
        super().__init__()
        if downsample not in ("stride", "maxpool") or pool not in ("mean", "flatten"):
            raise ValueError(f"downsample must be stride|maxpool and pool mean|flatten, got {downsample!r}, {pool!r}")
        blocks = [ConvBlock(in_channels if i == 0 else hidden, hidden, downsample, norm, norm_eps) for i in range(4)]
        if pool == "mean":
            reduce: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            n_features = hidden
        else:
            side = _downsampled(image_size, downsample)
            if side < 1:
                raise ValueError(f"image_size {image_size} is too small for four downsamplings")
            reduce, n_features = [nn.Flatten()], hidden * side * side
        self.channels_last = channels_last
        self.features = nn.Sequential(*blocks, *reduce)
        self.head = nn.Linear(n_features, n_way)
        if init == "reference":  # cbfinn/maml maml.py construct_conv_weights
            for m in self.features.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.xavier_uniform_(m.weight)
            if pool == "mean":  # Omniglot: tf.random_normal([hidden, n_way]), stddev 1
                nn.init.normal_(self.head.weight, std=1.0)
            else:               # mini-ImageNet: xavier_initializer
                nn.init.xavier_uniform_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        elif init != "torch":
            raise ValueError(f"init must be reference or torch, got {init!r}")
        if channels_last:
            self.features.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, n_way)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.features(x))


class SameConv2d(nn.Conv2d):
    """A convolution padded as TensorFlow's padding='same': output ceil(size / stride), the odd pixel
    of padding on the bottom/right (PyTorch's symmetric padding shifts a stride-2 grid by one pixel)."""

    def forward(self, x: Tensor) -> Tensor:
        pads: list[int] = []
        for size, k, s in reversed(list(zip(x.shape[-2:], self.kernel_size, self.stride))):  # W first, as F.pad
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return self._conv_forward(F.pad(x, pads), self.weight, self.bias)


class ReptileConv4(nn.Module):
    """The network of Nichol et al.'s code (supervised_reptile/models.py), as TensorFlow builds it.

    4 x [3x3 conv with bias, padding 'same'; BatchNorm (scale and shift, eps 1e-3, batch statistics:
    `tf.layers.batch_normalization(training=True)`); ReLU], downsampled by stride 2 (Omniglot) or by a
    2x2 max-pool with 'same' padding (mini-ImageNet, pool before the ReLU: the same thing), then the
    final map *flattened* (2x2x64 Omniglot, 6x6x32 mini-ImageNet) into a linear head. Kernels
    Glorot-uniform, biases zero (TF's defaults). The flatten runs over (C, H, W) where TF's runs over
    (H, W, C): a fixed permutation of the head's inputs, the same network under an i.i.d. init.

    Example:
        model = ReptileConv4(1, n_way=5)        # Omniglot: (N, 1, 28, 28) -> (N, 5)
    """

    def __init__(self, in_channels: int, n_way: int, hidden: int = 64,
                 downsample: Literal["stride", "maxpool"] = "stride", image_size: int = 28,
                 channels_last: bool = False, norm_eps: float = 1e-3):
        super().__init__()
        if downsample not in ("stride", "maxpool"):
            raise ValueError(f"downsample must be stride|maxpool, got {downsample!r}")
        blocks: list[nn.Module] = []
        side = image_size
        for i in range(4):
            layers: list[nn.Module] = [
                SameConv2d(in_channels if i == 0 else hidden, hidden, 3, stride=2 if downsample == "stride" else 1),
                batch_norm(nn.BatchNorm2d, hidden, "affine", norm_eps)]
            if downsample == "maxpool":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))  # TF 'same' pooling: the odd last row alone
            blocks.append(nn.Sequential(*layers, nn.ReLU()))
            side = math.ceil(side / 2)
        self.channels_last = channels_last
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Linear(hidden * side * side, n_way)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if channels_last:
            self.features.to(memory_format=torch.channels_last)

    forward = Conv4.forward  # (N, C, H, W) -> (N, n_way)


class FCNet(nn.Module):
    """The paper's "MAML, no conv" classifier: Linear -> BatchNorm -> ReLU per hidden layer.

    Args:
        in_features: flattened input size (784 for 28x28 Omniglot); images are flattened here.
        n_way: classes per task.
        hidden: hidden widths (the paper: 256, 128, 64, 64).
        norm, norm_eps, init: as `Conv4` (reference init: N(0, 0.01) truncated, zero biases).

    Example:
        model = FCNet(784, n_way=5)
        logits = model(torch.randn(25, 1, 28, 28))   # (25, 5)
    """

    def __init__(self, in_features: int, n_way: int, hidden: tuple[int, ...] | list[int] = (256, 128, 64, 64),
                 norm: Norm = "affine", norm_eps: float = 1e-5, init: Init = "torch"):
        super().__init__()
        sizes = [in_features, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b, bias=False), batch_norm(nn.BatchNorm1d, b, norm, norm_eps), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(sizes[-1], n_way)
        if init == "reference":  # cbfinn/maml maml.py construct_fc_weights
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    truncated_normal_(m.weight, std=0.01)
            nn.init.zeros_(self.head.bias)
        elif init != "torch":
            raise ValueError(f"init must be reference or torch, got {init!r}")

    def forward(self, x: Tensor) -> Tensor:  # (N, ...) -> (N, n_way)
        return self.head(self.features(x))


class VGGMAMLPP(nn.Module):
    """MAML++'s VGGReLUNormNetwork with max-pooling: 4 x [3x3 conv (stride 1, padding 1, bias),
    BatchNorm, leaky ReLU, 2x2 max-pool], flattened, then a linear head.

    As the reference (meta_neural_network_architectures.py L545-660): convolution and linear
    weights xavier-uniform, biases zero (`init="reference"`); BatchNorm weight 1, bias 0, eps 1e-5,
    scale and shift learned (`norm="affine"`; MAML++ replaces it by its per-step layer, which
    learns both whatever `norm` says). The conv bias feeding a BatchNorm is kept for parity, though
    batch statistics cancel it. Features: hidden x 1 x 1 for 28x28 Omniglot, hidden x 5 x 5 for
    84x84 mini-ImageNet.

    Args:
        in_channels: image channels.
        n_way: classes per task.
        hidden: filters per conv layer (reference: 64 Omniglot, 48 mini-ImageNet).
        image_size: side of the square input (sizes the head).
        norm, norm_eps: BatchNorm's learned parameters ("shift" or "affine") and epsilon.
        init: "reference" (xavier-uniform weights, zero biases) or "torch" (PyTorch's defaults).

    Example:
        model = VGGMAMLPP(3, n_way=5, hidden=48, image_size=84)
        logits = model(torch.randn(10, 3, 84, 84))   # (10, 5)
    """

    def __init__(self, in_channels: int, n_way: int, hidden: int = 64, image_size: int = 28,
                 norm: Norm = "affine", norm_eps: float = 1e-5, init: Init = "reference"):
        super().__init__()
        layers: list[nn.Module] = []
        side = image_size
        for i in range(4):
            layers += [nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, stride=1, padding=1, bias=True),
                       batch_norm(nn.BatchNorm2d, hidden, norm, norm_eps), nn.LeakyReLU(0.01), nn.MaxPool2d(2)]
            side //= 2
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for four 2x2 max-pools")
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(hidden * side * side, n_way)
        if init not in ("reference", "torch"):
            raise ValueError(f"init must be reference or torch, got {init!r}")
        for m in self.modules() if init == "reference" else ():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, n_way)
        return self.head(self.features(x))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "conv4_omniglot": lambda n_way, in_channels=1, image_size=28, hidden=64, channels_last=False, **net: Conv4(
        in_channels, n_way, hidden, "stride", "mean", image_size, channels_last, **net),
    "conv4_miniimagenet": lambda n_way, in_channels=3, image_size=84, hidden=32, channels_last=False, **net: Conv4(
        in_channels, n_way, hidden, "maxpool", "flatten", image_size, channels_last, **net),
    "mlp_omniglot": lambda n_way, in_channels=1, image_size=28, hidden=(256, 128, 64, 64), channels_last=False,
    **net: FCNet(in_channels * image_size * image_size, n_way, hidden, **net),
    # Nichol et al.'s network: its own BatchNorm (scale and shift) and init (Glorot, zero biases); the
    # benchmark's `norm` and `init` describe the MAML code's network, so they are not passed on.
    "conv4_reptile_omniglot": lambda n_way, in_channels=1, image_size=28, hidden=64, channels_last=False,
    norm_eps=1e-3, **net: ReptileConv4(in_channels, n_way, hidden, "stride", image_size, channels_last, norm_eps),
    "conv4_reptile_miniimagenet": lambda n_way, in_channels=3, image_size=84, hidden=32, channels_last=False,
    norm_eps=1e-3, **net: ReptileConv4(in_channels, n_way, hidden, "maxpool", image_size, channels_last, norm_eps),
    "vgg_mamlpp": lambda n_way, in_channels=1, image_size=28, hidden=64, channels_last=False, **net: VGGMAMLPP(
        in_channels, n_way, hidden, image_size, **net),
}


def build_model(name: str, n_way: int, *, in_channels: int | None = None, image_size: int | None = None,
                hidden=None, channels_last: bool = False, **net) -> nn.Module:
    """A classifier from `MODELS` by name; unset arguments take the paper's values for that model.

    Args:
        name: a key of `MODELS` (conv4_omniglot, conv4_miniimagenet, conv4_reptile_omniglot,
            conv4_reptile_miniimagenet, mlp_omniglot, vgg_mamlpp).
        n_way: classes per task.
        in_channels, image_size: input shape (defaults: 1x28x28 Omniglot, 3x84x84 mini-ImageNet).
        hidden: filters (conv4) or hidden widths (mlp).
        channels_last: NHWC convolutions (conv4 only; ignored by the MLP).
        **net: the network's own options (conv4, mlp and vgg_mamlpp: `norm`, `norm_eps`, `init`).

    Example:
        model = build_model("conv4_omniglot", n_way=20)
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    kwargs = dict(in_channels=in_channels, image_size=image_size, hidden=hidden, channels_last=channels_last)
    return MODELS[name](n_way, **{k: v for k, v in kwargs.items() if v is not None}, **net)
