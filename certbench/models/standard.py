"""The shared architectures: an MLP, the Kolter–Wong small CNN and the DeepMind IBP large CNN.

Both CNNs take ``batch_norm`` (default false): a BatchNorm after every convolution and the hidden
Linear layer, before its ReLU, as the CNN-7 of Shi et al. (NeurIPS 2021, "Fast certified robust
training with short warmup", their second improvement; ``cnn-large`` with it is their CNN-7).
The default builds the same modules as before the option existed, so stored models still load, and an
unset arch parameter is not part of a run's hash (only method parameters are filled into it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from certbench.data.specs import DatasetSpec
from certbench.models import register_arch
from certbench.nn import Normalize

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


def _flat_size(features: nn.Module, spec: DatasetSpec) -> int:
    """Features per sample after ``features``, run once in eval mode (BatchNorm cannot normalise a
    batch of one); the modules' training flags are left as they were."""
    modes = {module: module.training for module in features.modules()}
    try:
        with torch.no_grad():
            return int(features.eval()(torch.zeros(1, *spec.shape)).numel())
    finally:
        for module, mode in modes.items():
            module.training = mode


def _conv_net(
    spec: DatasetSpec, convs: Sequence[tuple[int, int, int, int]], hidden: int, batch_norm: bool = False
) -> nn.Sequential:
    """Normalize → (conv → [BN] → ReLU)* → flatten → fc(hidden) → [BN] → ReLU → fc(classes); convs as
    (out, kernel, stride, pad). ``batch_norm``: BatchNorm2d after each conv and BatchNorm1d after the
    hidden fc (Shi et al. 2021's CNN-7), none after the classifier."""
    layers: list[nn.Module] = [Normalize(spec.mean, spec.std)]
    channels = spec.shape[0]
    for out, kernel, stride, padding in convs:
        layers.append(nn.Conv2d(channels, out, kernel, stride, padding))
        layers += [nn.BatchNorm2d(out)] if batch_norm else []
        layers.append(nn.ReLU())
        channels = out
    layers.append(nn.Flatten())
    flat = _flat_size(nn.Sequential(*layers), spec)
    layers.append(nn.Linear(flat, hidden))
    layers += [nn.BatchNorm1d(hidden)] if batch_norm else []
    layers += [nn.ReLU(), nn.Linear(hidden, spec.num_classes)]
    return nn.Sequential(*layers)


#: The ``params_schema`` of the CNNs: Shi et al.'s (2021) BatchNorm layers, off by default.
CNN_PARAMS = {
    "batch_norm": {
        "type": "boolean",
        "default": False,
        "description": "BatchNorm after every conv and the hidden fc, before the ReLU (Shi et al. 2021)",
    }
}


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


@register_arch("cnn-small", params_schema=CNN_PARAMS)
def cnn_small(spec: DatasetSpec, *, batch_norm: bool = False) -> nn.Sequential:
    """Kolter & Wong (2018) small CNN: conv16 4×4 s2 → conv32 4×4 s2 → fc100 → fc (``batch_norm``:
    BatchNorm before each ReLU, as Shi et al. 2021 put it in their CNN-7)."""
    return _conv_net(spec, [(16, 4, 2, 1), (32, 4, 2, 1)], 100, batch_norm)


@register_arch("cnn-large", params_schema=CNN_PARAMS)
def cnn_large(spec: DatasetSpec, *, batch_norm: bool = False) -> nn.Sequential:
    """Gowal et al. (2018) "large": conv64-64-128(s2)-128-128 (3×3) → fc512 → fc. With ``batch_norm``,
    the CNN-7 of Shi et al. (2021): BatchNorm after each conv and after fc512, before the ReLU."""
    return _conv_net(
        spec, [(64, 3, 1, 1), (64, 3, 1, 1), (128, 3, 2, 1), (128, 3, 1, 1), (128, 3, 1, 1)], 512, batch_norm
    )
