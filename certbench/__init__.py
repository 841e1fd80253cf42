"""certbench: train and certify robust neural networks side by side.

The package root stays free of heavy imports (no torch) so that the Snakefile can
import :mod:`certbench.config` while building the DAG.
"""

__version__ = "0.1.0"
