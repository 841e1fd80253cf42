"""Wide residual network WRN-16-4 (Zagoruyko & Komodakis 2016), the LMT paper's SVHN model.

Pre-activation blocks BN → ReLU → conv3×3 → BN → ReLU → dropout → conv3×3 with a 1×1 conv
shortcut where the width or stride changes; as in the reference implementation that shortcut
reads the block's pre-activated input. Everything is ``nn.Sequential`` and
:class:`~certbench.nn.Residual`, so :mod:`certbench.bounds.lipschitz` can bound it.
"""

from __future__ import annotations

from torch import nn

from certbench.data.specs import DatasetSpec
from certbench.models import register_arch
from certbench.nn import Normalize, Residual


def _conv3(inputs: int, outputs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)


def _block(inputs: int, outputs: int, stride: int, dropout: float) -> nn.Module:
    """One pre-activation basic block (WRN paper, Fig. 1c with dropout between the convs)."""
    body = [_conv3(inputs, outputs, stride), nn.BatchNorm2d(outputs), nn.ReLU()]
    if dropout > 0:
        body.append(nn.Dropout(dropout))
    body.append(_conv3(outputs, outputs))
    if inputs == outputs and stride == 1:
        pre = [nn.BatchNorm2d(inputs), nn.ReLU()]
        return Residual(nn.Sequential(*pre, *body))
    shortcut = nn.Conv2d(inputs, outputs, 1, stride, 0, bias=False)
    return nn.Sequential(nn.BatchNorm2d(inputs), nn.ReLU(), Residual(nn.Sequential(*body), shortcut))


def wide_resnet(spec: DatasetSpec, depth: int, widen_factor: int, dropout: float = 0.0) -> nn.Sequential:
    """WRN-depth-k: 3 groups of (depth − 4)/6 blocks of widths 16k, 32k, 64k (strides 1, 2, 2)."""
    if (depth - 4) % 6 or depth < 10:
        raise ValueError(f"WRN depth must be 6n + 4 with n ≥ 1, got {depth}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    per_group = (depth - 4) // 6
    widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    layers: list[nn.Module] = [Normalize(spec.mean, spec.std), _conv3(spec.shape[0], widths[0])]
    for group, stride in enumerate((1, 2, 2)):
        for i in range(per_group):
            inputs = widths[group] if i == 0 else widths[group + 1]
            layers.append(_block(inputs, widths[group + 1], stride if i == 0 else 1, dropout))
    layers += [
        nn.BatchNorm2d(widths[3]),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(widths[3], spec.num_classes),
    ]
    return nn.Sequential(*layers)


@register_arch(
    "wrn-16-4",
    params_schema={"dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.0}},
)
def wrn_16_4(spec: DatasetSpec, *, dropout: float) -> nn.Sequential:
    """WRN-16-4; the LMT paper trains it on SVHN with dropout 0.4."""
    return wide_resnet(spec, 16, 4, dropout)
