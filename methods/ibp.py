"""``ibp``: interval bound propagation training (Gowal et al. 2018) through auto_LiRPA.

The loss mixes natural and robust cross-entropy, ``κ·CE(z, y) + (1−κ)·CE(−lb, y)``
(Gowal et al. eq. 7), where ``lb`` lower-bounds the margins z_y − z_j over the clipped box
[x − ε, x + ε] ∩ [0, 1] and the robust CE pads ``−lb`` with 0 at the label (Zhang et al.
2020, eq. 5). ε ramps from 0 to ε_train over ``schedule_length`` epochs starting at
``schedule_start``, linearly or "smoothed" (power 4 up to a quarter of the ramp, then
linear, as DeepMind's IBP code), and κ = 1 − (ε/ε_train)(1 − κ_final) follows it.
"""

from __future__ import annotations

from certbench.method import register_method
from methods._bound_propagation import BoundPropagationMethod


@register_method("ibp")
class IBP(BoundPropagationMethod):
    """IBP-trained ReLU network (mlp, cnn-small, cnn-large)."""
