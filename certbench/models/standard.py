"""The shared architectures: an MLP, the Kolter–Wong small CNN and the DeepMind IBP large CNN."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from certbench.data.specs import DatasetSpec
from certbench.models import register_arch
from certbench.nn import Normalize

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


def _flat_size(features: nn.Module, spec: DatasetSpec) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *spec.shape)).numel())


def _conv_net(spec: DatasetSpec, convs: Sequence[tuple[int, int, int, int]], hidden: int) -> nn.Sequential:
    """Normalize → (conv → ReLU)* → flatten → fc(hidden) → ReLU → fc(classes); convs as
    (out, kernel, stride, pad)."""
    layers: list[nn.Module] = [Normalize(spec.mean, spec.std)]
    channels = spec.shape[0]
    for out, kernel, stride, padding in convs:
        layers += [nn.Conv2d(channels, out, kernel, stride, padding), nn.ReLU()]
        channels = out
    layers.append(nn.Flatten())
    flat = _flat_size(nn.Sequential(*layers), spec)
    layers += [nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, spec.num_classes)]
    return nn.Sequential(*layers)


@register_arch(
    "mlp",
    params_schema={
        "widths": {"type": "array", "items": {"type": "integer", "minimum": 1}, "default": [256, 256]},
        "activation": {"enum": sorted(ACTIVATIONS), "default": "relu"},
        "input_pool": {"type": "integer", "minimum": 1, "default": 1},
    },
)
def mlp(spec: DatasetSpec, *, widths: Sequence[int], activation: str, input_pool: int) -> nn.Sequential:
    """Fully connected: Normalize → [k×k average pooling] → flatten → (Linear → activation)* → Linear.

    ``input_pool: 2`` reduces 28×28 images to 196 inputs, as the MLPs of Pauli et al. (2021).
    """
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = [Normalize(spec.mean, spec.std)]
    if input_pool > 1:
        layers.append(nn.AvgPool2d(input_pool))
    layers.append(nn.Flatten())
    previous = _flat_size(nn.Sequential(*layers), spec)
    for width in widths:
        layers += [nn.Linear(previous, int(width)), act()]
        previous = int(width)
    layers.append(nn.Linear(previous, spec.num_classes))
    return nn.Sequential(*layers)


@register_arch("cnn-small")
def cnn_small(spec: DatasetSpec) -> nn.Sequential:
    """Kolter & Wong (2018) small CNN: conv16 4×4 s2 → conv32 4×4 s2 → fc100 → fc."""
    return _conv_net(spec, [(16, 4, 2, 1), (32, 4, 2, 1)], 100)


@register_arch("cnn-large")
def cnn_large(spec: DatasetSpec) -> nn.Sequential:
    """Gowal et al. (2018) "large": conv64-64-128(s2)-128-128 (3×3) → fc512 → fc."""
    return _conv_net(
        spec, [(64, 3, 1, 1), (64, 3, 1, 1), (128, 3, 2, 1), (128, 3, 1, 1), (128, 3, 1, 1)], 512
    )
