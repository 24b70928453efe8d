"""Per-run state, kept one way for every technique: in the run's own ``transformer_options``.

Since ComfyUI 0.14 ``clone()`` shares patch objects between models, so nothing that belongs to one
sampling run may live on a patch. A technique's OUTER_SAMPLE wrapper puts its run object under its
own key with ``run_scope``; every hook of that run reads it back with ``run_state`` from the
``transformer_options`` (or ``model_options``) ComfyUI hands it. The guider's model options are
swapped for a nested copy for the run and restored after, so the key never outlives the run, even
when the run fails.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional


def _nested_copy(options: dict) -> dict:
    # comfy.model_patcher.create_model_options_clone, without importing ComfyUI here: dicts copied
    # at every level, everything else (patch objects, lists) shared.
    return {k: _nested_copy(v) if isinstance(v, dict) else v for k, v in options.items()}


@contextmanager
def run_scope(guider, key: str, state: Any) -> Iterator[Any]:
    """``guider.model_options["transformer_options"][key] = state`` for the duration of the run."""
    original = guider.model_options
    options = _nested_copy(original)
    options.setdefault("transformer_options", {})[key] = state
    guider.model_options = options
    try:
        yield state
    finally:
        guider.model_options = original


def run_state(options: Optional[dict], key: str) -> Any:
    """The run object under ``key``: ``options`` is a ``transformer_options`` dict or a whole
    ``model_options`` dict; None outside a run."""
    if not isinstance(options, dict):
        return None
    if key in options:
        return options[key]
    inner = options.get("transformer_options")
    return inner.get(key) if isinstance(inner, dict) else None
