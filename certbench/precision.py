"""Strict float32 arithmetic for certification and for the checks that audit it.

Every rounding allowance of the certificates assumes that a float32 layer is an ordinary sum of
products rounded to float32. torch lets several backends trade that for speed: TF32 matmuls and
convolutions on CUDA (about 5e-4 relative error), bf16/fp16 paths on oneDNN and cuBLAS, and
cuDNN/oneDNN convolution algorithms (FFT, Winograd) whose error is not that of a dot product.
:func:`strict_float32` switches all of them off, on CPU and CUDA alike, and restores the caller's
settings exactly on exit (also when the body raises).

torch 2.14 keeps two sets of flags: the legacy ones (``torch.backends.cuda.matmul.allow_tf32``,
``torch.backends.cudnn.allow_tf32``, ``torch.set_float32_matmul_precision``) and the per-backend
``fp32_precision`` settings (``torch.backends.fp32_precision``, ``…cuda.matmul``, ``…cudnn[.conv|.rnn]``,
``…mkldnn[.matmul|.conv|.rnn]``). A legacy getter raises when the user mixed the two APIs
inconsistently; such a legacy flag is then left alone (torch itself refuses to run the affected
kernels until the user resolves the mix), every other flag is set, and all are put back on exit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

_C = torch._C

#: (backend, op) pairs of torch's ``fp32_precision`` settings, parents before children (setting a
#: parent resets its children, so they are restored after it).
PRECISION_PAIRS: tuple[tuple[str, str], ...] = (
    ("generic", "all"),
    ("cuda", "all"),
    ("cuda", "matmul"),
    ("cuda", "conv"),
    ("cuda", "rnn"),
    ("mkldnn", "all"),
    ("mkldnn", "matmul"),
    ("mkldnn", "conv"),
    ("mkldnn", "rnn"),
)


def _pairs() -> list[tuple[str, str]]:
    """The pairs this torch knows (none before the ``fp32_precision`` API existed)."""
    if not hasattr(_C, "_get_fp32_precision_getter"):
        return []
    known = []
    for backend, op in PRECISION_PAIRS:
        try:
            _C._get_fp32_precision_getter(backend, op)
        except RuntimeError:
            continue
        known.append((backend, op))
    return known


def _read(getter: Callable[[], Any]) -> Any:
    """A legacy flag, or None where torch refuses to read it (legacy and new API mixed)."""
    try:
        return getter()
    except RuntimeError:
        return None


def _flag(name: str) -> tuple[Callable[[], Any], Callable[[Any], None]] | None:
    getter, setter = getattr(_C, f"_get_{name}", None), getattr(_C, f"_set_{name}", None)
    return None if getter is None or setter is None else (getter, setter)


def _reduction(name: str) -> tuple[Callable[[], Any], Callable[[Any], None]] | None:
    """cuBLAS fp16/bf16 reduced-precision reductions: the getter gives (allow, allow_split_k)."""
    flag = _flag(name)
    if flag is None:
        return None
    getter, setter = flag

    def set_value(value: Any) -> None:
        setter(*value) if isinstance(value, tuple) else setter(value)

    return getter, set_value


#: Boolean switches: (name, getter/setter, value inside the context). All are off inside.
def _switches() -> list[tuple[str, tuple[Callable[[], Any], Callable[[Any], None]], Any]]:
    switches = []
    for name, strict in (
        ("cudnn_enabled", False),
        ("mkldnn_enabled", False),
        ("cublas_allow_fp16_accumulation", False),
        ("cpu_allow_fp16_reduced_precision_reduction", False),
    ):
        flag = _flag(name)
        if flag is not None:
            switches.append((name, flag, strict))
    for name in (
        "cublas_allow_fp16_reduced_precision_reduction",
        "cublas_allow_bf16_reduced_precision_reduction",
    ):
        flag = _reduction(name)
        if flag is not None:
            switches.append((name, flag, (False, False)))
    return switches


def _snapshot() -> dict[str, Any]:
    """Every setting :func:`strict_float32` may change (legacy flags: None when unreadable)."""
    state: dict[str, Any] = {
        "float32_matmul_precision": _read(_C._get_float32_matmul_precision),
        "cudnn_allow_tf32": _read(_C._get_cudnn_allow_tf32),
    }
    for backend, op in _pairs():
        state[f"fp32_precision:{backend}.{op}"] = _C._get_fp32_precision_getter(backend, op)
    for name, (getter, _), _strict in _switches():
        state[name] = getter()
    return state


def _restore(state: dict[str, Any]) -> None:
    """Legacy flags first (their setters also write the new ones), then the new ones, then switches."""
    if state["float32_matmul_precision"] is not None:
        _C._set_float32_matmul_precision(state["float32_matmul_precision"])
    if state["cudnn_allow_tf32"] is not None:
        _C._set_cudnn_allow_tf32(state["cudnn_allow_tf32"])
    for backend, op in _pairs():
        _C._set_fp32_precision_setter(backend, op, state[f"fp32_precision:{backend}.{op}"])
    for name, (_, setter), _strict in _switches():
        setter(state[name])


def _strict_state(previous: dict[str, Any]) -> dict[str, Any]:
    state = {
        "float32_matmul_precision": "highest" if previous["float32_matmul_precision"] is not None else None,
        "cudnn_allow_tf32": False if previous["cudnn_allow_tf32"] is not None else None,
    }
    for backend, op in _pairs():
        state[f"fp32_precision:{backend}.{op}"] = "ieee"
    for name, _, strict in _switches():
        state[name] = strict
    return state


def describe_precision(device: torch.device | str | None = None) -> dict[str, Any]:
    """The float32 arithmetic torch's current settings give, as a small record.

    ``tf32`` is True when any flag allows TF32 (or bf16) for float32; ``cudnn``/``mkldnn`` whether
    those convolution libraries may be used; ``fp32_precision`` every ``(backend, op)`` setting.
    """
    pairs = {f"{b}.{o}": _C._get_fp32_precision_getter(b, o) for b, o in _pairs()}
    cublas, cudnn = _read(_C._get_cublas_allow_tf32), _read(_C._get_cudnn_allow_tf32)
    reduced = any(v in ("tf32", "bf16") for v in pairs.values())
    device = torch.device(device) if device is not None else torch.device("cpu")
    record: dict[str, Any] = {
        "dtype": "float32",
        # an unreadable legacy flag (legacy and new API mixed) counts as allowing TF32; cuDNN's only
        # matters while cuDNN is enabled
        "tf32": bool(reduced or cublas is not False or (_C._get_cudnn_enabled() and cudnn is not False)),
        "cudnn": bool(_C._get_cudnn_enabled()),
        "mkldnn": bool(_C._get_mkldnn_enabled()),
        "matmul_precision": _read(_C._get_float32_matmul_precision),
        "fp32_precision": pairs,
        "device": str(device),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        record["device_name"] = torch.cuda.get_device_name(device)
    return record


@contextmanager
def strict_float32(device: torch.device | str | None = None) -> Iterator[dict[str, Any]]:
    """IEEE float32 everywhere inside: no TF32, no bf16/fp16 reductions, no cuDNN or oneDNN (mkldnn).

    Yields :func:`describe_precision` as read back inside the context; raises RuntimeError (after
    restoring everything) if torch did not take a setting. On exit every setting is what it was.
    """
    previous = _snapshot()
    try:
        strict = _strict_state(previous)
        _restore(strict)
        now = _snapshot()
        wrong = {key: now[key] for key, value in strict.items() if value is not None and now[key] != value}
        if wrong:
            raise RuntimeError(f"strict float32: torch did not take the settings {wrong}")
        yield describe_precision(device)
    finally:
        _restore(previous)


def strict_precision(device: torch.device | str | None = None) -> dict[str, Any]:
    """What :func:`strict_float32` gives on ``device`` (for a record of checks that ran inside it)."""
    with strict_float32(device) as record:
        return record
