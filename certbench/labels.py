"""Human labels and plot styles for the keys that appear in records, tables and figures.

Torch-free and matplotlib-free: the tables, the figures and the report all read from here, so
that a method, certificate or column is called the same everywhere. Unknown keys fall back to
the key itself, so a newly registered method or certificate still shows (just less nicely).

Styles: one colour per experiment (its ``name``), with the hues of a method *family* (plain
training: greys; Lipschitz-margin training: blues; bound-propagation training: reds and
oranges; ℓ∞-dist nets: greens; LipSDP training: purples), and one marker per architecture.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from certbench.config import format_eps

NORMS = {"l2": "ℓ2", "linf": "ℓ∞"}

METHODS = {
    "standard": "standard training",
    "weight-decay": "weight decay",
    "spectral": "spectral-norm reg.",
    "parseval": "Parseval networks",
    "lipschitz-reg": "Lipschitz reg.",
    "lmt": "LMT",
    "ibp": "IBP",
    "crown-ibp": "CROWN-IBP",
    "sabr": "SABR",
    "mtl-ibp": "MTL-IBP",
    "linf-dist": "ℓ∞-dist net",
    "linf-dist-head": "ℓ∞-dist net + MLP",
    "sortnet": "SortNet",
    "lipsdp-admm": "LipSDP training",
}
FAMILIES = {
    "standard": "plain",
    "weight-decay": "plain",
    "spectral": "lipschitz",
    "parseval": "lipschitz",
    "lipschitz-reg": "lipschitz",
    "lmt": "lipschitz",
    "ibp": "bounds",
    "crown-ibp": "bounds",
    "sabr": "bounds",
    "mtl-ibp": "bounds",
    "linf-dist": "linf-dist",
    "linf-dist-head": "linf-dist",
    "sortnet": "linf-dist",
    "lipsdp-admm": "lipsdp",
}
FAMILY_LABELS = {
    "plain": "plain training",
    "lipschitz": "Lipschitz-margin training",
    "bounds": "bound-propagation training",
    "linf-dist": "ℓ∞-dist nets",
    "lipsdp": "LipSDP training",
    "other": "other",
}
# Distinct hues inside each family (colour-blind-safe where the family allows).
FAMILY_PALETTES = {
    "plain": ["#333333", "#8c8c8c", "#8c564b"],
    "lipschitz": ["#1f77b4", "#17becf", "#393b79", "#6baed6", "#3182bd"],
    "bounds": ["#d62728", "#ff7f0e", "#e377c2", "#ad494a"],
    "linf-dist": ["#2ca02c", "#bcbd22", "#006d2c", "#74c476"],
    "lipsdp": ["#9467bd", "#c5b0d5", "#5e3c99"],
    "other": ["#7f7f7f", "#e7ba52", "#843c39", "#7b4173"],
}
ARCHS = {
    "mlp": "MLP",
    "cnn-small": "small CNN",
    "cnn-large": "large CNN",
    "wrn-16-4": "WRN-16-4",
    "linf-dist-mlp": "ℓ∞-dist MLP",
    "linf-dist-mlp+head": "ℓ∞-dist MLP + head",
    "sortnet-mlp": "SortNet MLP",
}
ARCH_MARKERS = {
    "mlp": "o",
    "cnn-small": "s",
    "cnn-large": "D",
    "wrn-16-4": "P",
    "linf-dist-mlp": "^",
    "linf-dist-mlp+head": "v",
    "sortnet-mlp": "8",
}
SPARE_MARKERS = ["X", "*", "h", "<", ">", "p", "d"]

CERTIFICATES = {
    "lipschitz-l2": "Lipschitz margin (ℓ2)",
    "lipsdp-l2": "LipSDP (ℓ2)",
    "ibp": "IBP (ℓ∞)",
    "crown": "CROWN (ℓ∞)",
    "crown-ibp": "CROWN-IBP (ℓ∞)",
    "alpha-crown": "α-CROWN (ℓ∞)",
    "cascade": "verifier cascade (ℓ∞)",
    "linf-dist": "ℓ∞-dist / SortNet margin (ℓ∞)",
    "linf-dist-l2": "ℓ∞-dist / SortNet margin read in ℓ2",
}
DATASETS = {
    "digits": "digits (8×8)",
    "mnist": "MNIST",
    "fashion-mnist": "Fashion-MNIST",
    "cifar10": "CIFAR-10",
}

# Fixed table columns: header, and whether the values are fractions shown in percent.
COLUMNS = {
    "dataset": "data set",
    "name": "experiment",
    "method": "training method",
    "arch": "architecture",
    "seed": "seed",
    "seeds": "runs",
    "status": "status",
    "runs": "runs",
    "certificate": "certificate",
    "clean_accuracy": "clean accuracy (%)",
    "clean": "clean accuracy (%)",
    "seconds_per_epoch": "seconds per epoch",
    "peak_memory_mb": "peak memory (MB)",
    "parameters": "parameters",
    "epochs": "epochs",
    "time_vs_standard": "time vs standard training",
    "checks": "checks",
    "violations": "violations",
    "worst_ratio": "worst ratio attack norm / certified radius",
}


def method_label(name: str) -> str:
    return METHODS.get(name, name)


def arch_label(arch: str) -> str:
    return ARCHS.get(arch, arch)


def certificate_label(name: str) -> str:
    return CERTIFICATES.get(name, name)


def dataset_label(name: str) -> str:
    return DATASETS.get(name, name)


def norm_label(norm: str) -> str:
    return NORMS.get(norm, norm)


def family(method: str) -> str:
    return FAMILIES.get(method, "other")


def experiment_label(name: str, arch: str) -> str:
    """``LMT · small CNN``: the experiment's name (a method's human name when it is one) and architecture."""
    return f"{method_label(name)} · {arch_label(arch)}"


def accuracy_label(what: str, norm: str, eps: float) -> str:
    """``certified accuracy (%) at ℓ∞ ε = 0.1``: a column of accuracies at one ε."""
    return f"{what} (%) at {norm_label(norm)} ε = {format_eps(eps)}"


def certified_by_label(certificate: str, norm: str, eps: float) -> str:
    """``certified by crown (%) at ℓ∞ ε = 0.1``: one certificate's certified accuracy at one ε."""
    return f"certified by {certificate} (%) at {norm_label(norm)} ε = {format_eps(eps)}"


def radius_label(statistic: str, certificate: str, norm: str, normalised: bool) -> str:
    """``median normalised ℓ2 radius (lipschitz-l2)``: a statistic of one certificate's radii."""
    words = [statistic, "normalised" if normalised else "", norm_label(norm), "radius"]
    return f"{' '.join(w for w in words if w)} ({certificate})"


def errors_label(name: str) -> str:
    """``ibp errors``: the samples on which a certificate (or attack) failed."""
    return f"{name} errors"


def published_label(label: str) -> str:
    return f"published {label}"


def difference_label(label: str) -> str:
    """``Δ clean accuracy (points, ours − published)``: ours minus the published figure of ``label``."""
    unit = "points, " if "(%)" in label else ""
    return f"Δ {label.replace(' (%)', '')} ({unit}ours − published)"


@dataclass(frozen=True)
class Style:
    """How one experiment is drawn: its legend label, colour and marker."""

    label: str
    color: str
    marker: str
    family: str


def styles(experiments: Iterable[tuple[str, str, str]]) -> dict[tuple[str, str], Style]:
    """A style per (name, arch) from ``(name, method, arch)`` triples, in a stable order.

    Experiments that share a name (the same method on two architectures) share a colour and
    differ by marker.
    """
    unique = sorted(
        set(experiments),
        key=lambda e: (
            list(FAMILY_PALETTES).index(family(e[1])) if family(e[1]) in FAMILY_PALETTES else 99,
            e,
        ),
    )
    colours: dict[str, str] = {}
    used: dict[str, int] = {}
    spare = iter(SPARE_MARKERS * 10)
    markers = dict(ARCH_MARKERS)
    result: dict[tuple[str, str], Style] = {}
    for name, method, arch in unique:
        group = family(method)
        if name not in colours:
            palette = FAMILY_PALETTES[group]
            colours[name] = palette[used.get(group, 0) % len(palette)]
            used[group] = used.get(group, 0) + 1
        if arch not in markers:
            markers[arch] = next(spare)
        result[(name, arch)] = Style(experiment_label(name, arch), colours[name], markers[arch], group)
    return result
