"""Error messages for bad node input, in one wording: ``"<node>: input '<name>' <problem>; <fix>"``.

Pure Python (no ComfyUI, no torch), so math modules and the command-line tools can use it too.
"""
from __future__ import annotations

import math
from typing import Iterable


def input_error(node: str, name: str, problem: str, fix: str = "") -> ValueError:
    """A ValueError that names the node, the input and what to do about it."""
    text = f"{node}: input '{name}' {problem}"
    return ValueError(f"{text}; {fix.rstrip('.')}." if fix else f"{text.rstrip('.')}.")


def check_choice(value, choices: Iterable[str], node: str, name: str, fix: str = "") -> str:
    """``value`` if it is one of ``choices``, else a ValueError listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise input_error(node, name, f"must be one of {', '.join(map(str, choices))}, got {value!r}", fix)
    return value


def check_finite(value, node: str, name: str, fix: str = "") -> float:
    """``float(value)`` if it is a finite number, else a ValueError (NaN never passes silently)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise input_error(node, name, f"must be a finite number, got {value!r}", fix)
    return number
