"""Index lists typed into a node's text input: ``"4"``, ``"4-11"``, ``"1, 3-5"`` (decoder blocks,
noise steps). Pure Python; every error names the node and the input."""
from __future__ import annotations

from .node_errors import input_error


def parse_index_list(text: str, low: int, high: int, node: str, name: str, what: str = "decoder block",
                     allow_none: bool = False, prefixes: tuple[str, ...] = ()) -> tuple[int, ...]:
    """Sorted unique ints in [low, high]. ``"none"`` (or ``"-"``) gives () where ``allow_none``;
    ``prefixes`` are stripped from each part (``"output.4"``)."""
    text = str(text or "").strip()
    if allow_none and text.lower() in ("none", "-"):
        return ()
    out: set[int] = set()
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        for prefix in prefixes:
            part = part.removeprefix(prefix)
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = (int(p) for p in part.split("-", 1))
                values = range(a, b + 1)
            else:
                values = range(int(part), int(part) + 1)
        except ValueError:
            raise input_error(node, name, f"has {part!r}", f"write {what} numbers like '4', '4-11' or '1, 3-5'") from None
        for v in values:
            if not low <= v <= high:
                raise input_error(node, name, f"names {what} {v}, which does not exist", f"use {low}-{high}")
            out.add(v)
    if not out:
        none = " or 'none'" if allow_none else ""
        raise input_error(node, name, f"names no {what}", f"write numbers like '4', '4-11' or '1, 3-5'{none}")
    return tuple(sorted(out))
