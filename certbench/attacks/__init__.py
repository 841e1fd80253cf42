"""Adversarial attacks behind one interface, for evaluation and for auditing certificates.

Registered attacks (``ATTACKS.names()``), defaults from METHODS.md "Attacks used for evaluation":

- ``deepfool-l2`` (l2, minimal): steps 50, overshoot 0.02, every class a candidate, on logits.
- ``cw-l2`` (l2, minimal): steps 100, stepsize 0.01, confidence 0, initial_const 1e-3,
  binary_search_steps 9, abort_early.
- ``ddn-l2`` (l2, minimal): steps 100, init_epsilon 1, gamma 0.05.
- ``fmn-linf`` (linf, minimal): steps 100, max_stepsize 1, gamma 0.05, binary_search_steps 10.
- ``pgd-linf`` / ``pgd-l2`` (eps): steps 50, rel_stepsize 0.25 (step ε/4), random_start.
- ``autoattack-linf`` / ``autoattack-l2`` (eps): AutoAttack's standard version (Croce & Hein 2020):
  APGD-CE, APGD-T, FAB-T and Square; steps 100, n_target_classes 9, n_queries 5000, n_restarts 1.

An attack is a runner function in a module of this package, decorated with
``@register_attack("<name>", norm=…, kind=…, params_schema={…})``; the modules are imported on the
first registry lookup.

``kind == "minimal"``: run once per model, gives the smallest perturbation found per sample.
``kind == "eps"``: run once per ε. Usage::

    attack = Attack("pgd-linf", steps=100)          # settings checked here (ConfigError, a ValueError)
    result = attack.run(model, x, y, eps=0.1)        # one batch; AttackResult with our own checks
    table = attack_table(model, x, y, ["deepfool-l2", "pgd-linf"], eps={"linf": [0.1, 0.3]})
"""

from __future__ import annotations

from certbench.attacks.base import ATTACKS, Attack, AttackResult, AttackSpec, Kind, Norm, register_attack
from certbench.attacks.table import FIELDS, attack_table, column, format_eps

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackResult",
    "AttackSpec",
    "FIELDS",
    "Kind",
    "Norm",
    "attack_table",
    "column",
    "format_eps",
    "register_attack",
]
