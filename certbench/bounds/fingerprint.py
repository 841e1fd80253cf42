"""A digest of a module's structure and content, the key of every cache of bounds.

A bound computed for one set of weights must never be served for another: the caches of exact
Lipschitz bounds, of CROWN bounds and of operator norms key on this digest, not on object identity.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

#: Module attributes that are torch's bookkeeping (or hashed separately), not settings of the layer.
_BOOKKEEPING = frozenset({"training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})


def _hash_tensor(digest: hashlib._Hash, name: str, tensor: torch.Tensor) -> None:
    data = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(f"{name}:{data.dtype}:{tuple(tensor.shape)}:".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes())


def fingerprint(model: nn.Module) -> str:
    """A digest of the model's structure and content: every module's type and plain attributes
    (kernel sizes, strides, padding modes, ``p``, …), its extra state, and the bytes, dtype and
    shape of every parameter, buffer and tensor attribute. It changes when a layer is swapped in
    place, a setting is changed, or a weight or buffer is modified in place or replaced."""
    digest = hashlib.blake2b(digest_size=32)
    for name, module in model.named_modules(remove_duplicate=False):
        kind = type(module)
        digest.update(f"module {name}: {kind.__module__}.{kind.__qualname__}@{id(kind)}\n".encode())
        for key, value in sorted(vars(module).items()):
            if key in _BOOKKEEPING or "hook" in key:
                continue
            if isinstance(value, torch.Tensor):
                _hash_tensor(digest, f"{name}.{key}", value)
            else:
                digest.update(f"{key}={value!r}\n".encode())
        if kind.get_extra_state is not nn.Module.get_extra_state:
            digest.update(f"extra state {module.get_extra_state()!r}\n".encode())
        for key, tensor in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
            _hash_tensor(digest, f"{name}.{key}", tensor)
    return digest.hexdigest()
