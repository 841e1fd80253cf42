"""``linf-dist``: ℓ∞-dist nets (Zhang et al., ICML 2021) with the v1 hinge or the v2 loss (ICLR 2022).

Training relaxes ℓ∞ to ℓp: every ℓ∞-dist layer uses ``p = p_start`` until epoch e2, then
``p = p_start·(p_end/p_start)^r`` with r going linearly from 0 at e2 to 1 at e3, then ``p = ∞``
to the end (total = the run's epochs). ε grows linearly from 0 at e0 to ``eps_train`` at e1.

ε is given in pixel units and converted to the logit scale with the ℓ∞ Lipschitz factor of the
input normalisation, ``1/min(std)`` (the paper's "ε / std"); the layers themselves are
1-Lipschitz at ``p = ∞``.

* v1 (hinge mixture): ``mix·max_{j≠y}[m_j]₊ + (1−mix)·mean_{j≠y}[m_j]₊`` with
  ``m_j = z_j − z_y + θ``, ``θ = 2ε`` (paper §5: a margin of 2ε certifies ε).
* v2 (clipped hinge + cross-entropy): ``max_j clip((z_j − z_y + 2ε)/(2ε_train), 0, 1) + λ·CE(s·z)``
  with a learnable scalar ``s`` (a model parameter outside the forward pass, so it never changes
  the certified logits) and ``λ = λ_start·(λ_end/λ_start)^r`` decaying with the same r as p.
"""

from __future__ import annotations

from certbench.method import register_method
from methods._linf_dist import LinfDistBase


@register_method("linf-dist")
class LinfDistMethod(LinfDistBase):
    """ℓ∞-dist net with the p schedule; ``loss`` selects the v1 or the v2 objective."""
