"""The source cache (``source_mode`` 'cache' / 'cache on CPU'): the source branch's injected tensors,
kept with the PLUGKIT_PNP_SOURCE and keyed by what they depend on.

Pure torch (no ComfyUI import): the model patcher and its options are only read.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class SourceCache:
    """The source branch's injected tensors, computed once per source, schedule, prompt and model.

    ``key``: what the tensors depend on (the source's trajectory and prompt digest, the model's
    identity and patches, the storage device); a run with another key starts a new cache (one per
    source: memory stays bounded by one source's windows). ``steps``: for each sigma of the schedule
    (a float), a dict ``layer -> tensor`` with ``("features", block)`` -> the block's residual
    features (source rows, C, H, W) and ``("q", block, index)`` / ``("k", block, index)`` -> the
    self-attention queries / keys (source rows, tokens, channels), in the model's compute dtype.
    ``refs`` keeps the objects whose identity is in the key alive (so an id is never reused).
    """

    key: Any = None
    refs: tuple = ()
    on_cpu: bool = False
    steps: dict = field(default_factory=dict)

    def reset(self, key, refs: tuple = (), on_cpu: bool = False) -> bool:
        """Use ``key``; drops the tensors when it differs from the current one. True when kept."""
        if self.key == key and self.key is not None:
            return True
        self.key, self.refs, self.on_cpu, self.steps = key, tuple(refs), bool(on_cpu), {}
        return False

    def use(self, key, model, refs: tuple, on_cpu: bool) -> bool:
        """``reset`` for a run on ``model`` (held weakly as the first ref): the same ids on another
        model object never reuse the tensors. True when the cached tensors are kept."""
        if self.key == key and not (self.refs and self.refs[0]() is model):
            self.reset(None)
        return self.reset(key, (weakref.ref(model), *refs), on_cpu)

    def lookup(self, sigma: float, needed) -> Optional[dict]:
        """The tensors at ``sigma`` when every layer in ``needed`` is there, else None."""
        entry = self.steps.get(float(sigma))
        if entry is None or any(k not in entry for k in needed):
            return None
        return entry

    def store(self, sigma: float, record: dict) -> None:
        """Keep ``record`` (layer -> tensor) at ``sigma`` (detached; on the CPU when ``on_cpu``)."""
        entry = self.steps.setdefault(float(sigma), {})
        for k, t in record.items():
            t = t.detach()
            entry[k] = t.to("cpu", copy=True) if self.on_cpu else t.clone()  # compact: never a view of the batch

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self.steps.values() for t in e.values())

    def dtypes(self) -> list:
        return sorted({str(t.dtype).removeprefix("torch.") for e in self.steps.values() for t in e.values()})


def cache_layers(feature_blocks, attention_layers) -> tuple[tuple, tuple]:
    """The cache keys a feature-window call and an attention-window call need."""
    feats = tuple(("features", int(i)) for i in feature_blocks)
    attn = tuple((kind, ("output", int(i)), int(j)) for i, j in attention_layers for kind in ("q", "k"))
    return feats, attn


def cached_index(entry: dict, n: int, transformer_options: dict) -> Optional[torch.Tensor]:
    """For a cache hit: the cached source row of each of the ``n`` batch rows (as the in-batch
    source rows are laid out), or None when the cached rows do not fit this batch's chunks."""
    n_src = next(iter(entry.values())).shape[0] if entry else 1
    chunks = max(len(transformer_options.get("cond_or_uncond", [0])), 1)
    chunk = n // chunks if (n // chunks) * chunks == n else n
    if chunk % n_src != 0:
        return None
    return (torch.arange(n) % chunk) % n_src


def identity_parts(model_patcher, model_options: dict, own_key: str, unwrap: tuple = (), skip: tuple = ()):
    """(key, strong refs) of what the source branch's tensors depend on besides the source itself:
    the base model, its weight patches (``patches_uuid``) and dtype, and every other node's object
    patch, transformer patch, attention replace, wrapper and model function wrapper (by identity).
    PnP's own hooks are left out, they do not change the source rows: wrappers under ``own_key``,
    objects of the ``skip`` types, and ``unwrap`` types stand for the ``previous`` they wrap."""
    base = model_patcher.model
    key = [("model", id(base)), ("weights", str(getattr(model_patcher, "patches_uuid", None))),
           ("dtype", str(model_patcher.model_dtype()), str(getattr(base, "manual_cast_dtype", None)))]
    refs = []

    def add(kind, name, obj):
        while unwrap and isinstance(obj, unwrap):
            obj = obj.previous
        if obj is None or (skip and isinstance(obj, skip)):
            return
        key.append((kind, repr(name), id(obj)))
        refs.append(obj)

    for name, obj in model_patcher.object_patches.items():
        add("object", name, obj)
    to = model_options.get("transformer_options", {}) or {}
    for name, lst in (to.get("patches") or {}).items():
        for i, f in enumerate(lst):
            add("patch", (name, i), f)
    for name, d in (to.get("patches_replace") or {}).items():
        for where, f in d.items():
            add("replace", (name, where), f)
    for wtype, d in (to.get("wrappers") or {}).items():
        for wkey, lst in d.items():
            if wkey != own_key:
                for i, f in enumerate(lst):
                    add("wrapper", (wtype, wkey, i), f)
    add("model_function_wrapper", "", model_options.get("model_function_wrapper"))
    return tuple(sorted(key, key=repr)), refs
