"""The figures of :mod:`certbench.figures`, one module per kind (matplotlib, torch-free)."""
