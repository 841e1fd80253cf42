"""Run several attacks over a data set tensor in batches and collect one per-sample table.

Columns (each a numpy array with one entry per sample):

- ``label`` (int64), ``clean_pred`` (int64; −1 where the clean forward pass raised).
- Per minimum-norm attack ``A`` (``kind == "minimal"``):
  ``success:A`` (bool), ``adv_l2:A`` and ``adv_linf:A`` (float64: ‖x_adv − x‖ measured on the
  returned example; 0 for samples misclassified already, ``inf`` where no adversarial example was
  found, ``nan`` on error), ``error:A`` (bool), ``error_msg:A`` (str, "" where none).
- Per fixed-ε attack ``A`` and each ε of its norm: the same five fields suffixed ``@<ε>``, e.g.
  ``success:pgd-linf@0.1``; ε is written by :func:`format_eps` (``8/255`` gives ``@0.0313725``).
  Build names with :func:`column` rather than by hand.

Accuracy under attack at ε is ``mean(~success & ~error)`` over samples; a minimum-norm attack
beats ε on a sample where ``adv_<norm>:A <= ε``. Error samples are never counted robust.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from certbench.attacks.base import Attack, AttackResult, Norm
from certbench.config import format_eps
from certbench.progress import Progress, duration

log = logging.getLogger(__name__)

FIELDS: dict[str, type] = {
    "success": bool,
    "adv_l2": np.float64,
    "adv_linf": np.float64,
    "error": bool,
    "error_msg": object,
}


def column(field: str, attack: str, eps: float | None = None) -> str:
    """Column name ``<field>:<attack>`` or ``<field>:<attack>@<eps>`` (ε written by :func:`format_eps`)."""
    if field not in FIELDS:
        raise ValueError(f"unknown field '{field}'; known: {', '.join(FIELDS)}")
    return f"{field}:{attack}" if eps is None else f"{field}:{attack}@{format_eps(eps)}"


def _values(result: AttackResult, field: str) -> np.ndarray:
    if field == "adv_l2":
        return result.l2
    if field == "adv_linf":
        return result.linf
    if field == "error_msg":
        return np.where(result.error, result.error_message(), "")
    return getattr(result, field)


def attack_table(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Sequence[str | Attack],
    eps: Mapping[Norm, Sequence[float]] | None = None,
    *,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Run ``attacks`` (names with default settings, or configured :class:`Attack` objects) on ``(x, y)``.

    Fixed-ε attacks run once per ε in ``eps[attack.norm]``. All settings and ε values are
    checked before the first batch runs. Batch ``i`` uses random seed ``seed + i``.
    """
    configured = [Attack(a) if isinstance(a, str) else a for a in attacks]
    if not configured:
        raise ValueError("attack_table: no attacks given")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"attack_table: batch_size must be an integer >= 1, got {batch_size!r}")
    if len(x) != len(y):
        raise ValueError(f"attack_table: {len(x)} inputs but {len(y)} labels")
    runs: list[tuple[Attack, float | None]] = []
    for attack in configured:
        if attack.kind == "minimal":
            runs.append((attack, None))
            continue
        values = list((eps or {}).get(attack.norm, ()))
        if not values:
            raise ValueError(
                f"attack_table: {attack.name} is a fixed-eps attack but no {attack.norm} eps were given"
            )
        runs += [(attack, attack.check_eps(e, x)) for e in values]
    names = [column("success", attack.name, e) for attack, e in runs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"attack_table: columns would repeat: {', '.join(duplicates)}")

    n = len(x)
    table: dict[str, np.ndarray] = {
        "label": y.detach().cpu().numpy().astype(np.int64),
        "clean_pred": np.full(n, -1, dtype=np.int64),
    }
    for attack, e in runs:
        for field, dtype in FIELDS.items():
            table[column(field, attack.name, e)] = np.empty(n, dtype=dtype)
    batches = -(-n // batch_size)
    labels = [attack.name if e is None else f"{attack.name}@{format_eps(e)}" for attack, e in runs]
    seconds = dict.fromkeys(labels, 0.0)
    # one step per attack and batch: a log line at most every 30 s (and one at the end) in a log
    # file, a bar on a terminal; then the seconds each attack took
    with Progress(
        total=batches * len(runs), desc="attacks", unit="batch", log=log, every_seconds=30.0
    ) as progress:
        for batch, start in enumerate(range(0, n, batch_size)):
            rows = slice(start, min(start + batch_size, n))
            for (attack, e), label in zip(runs, labels):
                started = time.perf_counter()
                result = attack.run(model, x[rows], y[rows], e, seed=seed + batch)
                seconds[label] += time.perf_counter() - started
                table["clean_pred"][rows] = result.clean_pred
                for field in FIELDS:
                    table[column(field, attack.name, e)][rows] = _values(result, field)
                progress.update(attack=label)
    log.info("attack seconds: %s", ", ".join(f"{label} {duration(s)}" for label, s in seconds.items()))
    return table
