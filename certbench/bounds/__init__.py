"""Bounds on what a network can do over a set of inputs, the ground every certificate stands on.

* :mod:`~certbench.bounds.lipschitz`: layer-wise ℓ2 Lipschitz bounds (exact, rigorous and training modes);
* :mod:`~certbench.bounds.lipsdp`: LipSDP and its float64 verification;
* :mod:`~certbench.bounds.lirpa`: the auto_LiRPA adapter (IBP, CROWN, CROWN-IBP), made to run on
  today's torch by :mod:`~certbench.bounds.lirpa_compat`;
* :mod:`~certbench.bounds.linf_dist`: interval and ℓ∞ Lipschitz bounds of ℓ∞-dist networks and SortNets;
* :mod:`~certbench.bounds.rounding`: float64 enclosures and the floating-point forward error.

Importing the package imports none of them (auto_LiRPA is slow to import and patched on import).
Bounds build on :mod:`certbench.nn` (layers) and never import certificates, attacks, training or methods.
"""
