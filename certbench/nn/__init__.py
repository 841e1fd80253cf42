"""Building blocks shared by the architectures and the bound computations."""

from certbench.nn.layers import Normalize, Residual

__all__ = ["Normalize", "Residual"]
