"""Architectures: every registered one builds for data sets of different shapes."""

from __future__ import annotations

import pytest
import torch

from certbench.data import DATASETS
from certbench.models import ARCHITECTURES, build
from certbench.nn import Normalize

SMALL_PARAMS = {"mlp": {"widths": [16]}}


@pytest.mark.parametrize("arch", ARCHITECTURES.names())
@pytest.mark.parametrize("dataset", ["digits", "mnist", "cifar10"])
def test_every_architecture_builds_for_every_input_size(arch: str, dataset: str) -> None:
    spec = DATASETS.get(dataset)
    try:
        model = build(arch, spec, **SMALL_PARAMS.get(arch, {}))
    except ValueError as error:  # an architecture may refuse an input size it cannot take, with a message
        pytest.skip(str(error))
    assert any(isinstance(m, Normalize) for m in model.modules())
    model.eval()
    logits = model(torch.rand(3, *spec.shape))
    assert logits.shape == (3, spec.num_classes)
    assert torch.isfinite(logits).all()


def test_unknown_architecture_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="unknown architecture 'nope'; known: .*cnn-small.*mlp"):
        build("nope", DATASETS.get("digits"))
