"""The shared node helpers (pure Python): one error wording, index-list parsing, the lazy node list."""
from __future__ import annotations

import math
import pytest

from plugkit.nodes.block_lists import parse_index_list
from plugkit.nodes.node_errors import check_choice, check_finite, input_error


def test_input_error_names_node_input_and_fix():
    err = input_error("PlugKitX", "steps", "is 0", "use 1 or more")
    assert isinstance(err, ValueError)
    assert str(err) == "PlugKitX: input 'steps' is 0; use 1 or more."
    assert str(input_error("PlugKitX", "steps", "is 0")) == "PlugKitX: input 'steps' is 0."


def test_check_choice():
    assert check_choice("b", ("a", "b"), "PlugKitX", "mode") == "b"
    with pytest.raises(ValueError, match=r"^PlugKitX: input 'mode' must be one of a, b, got 'c'\.$"):
        check_choice("c", ("a", "b"), "PlugKitX", "mode")


def test_check_finite():
    assert check_finite("1.5", "N", "x") == 1.5
    for bad in (math.nan, math.inf, "abc", None):
        with pytest.raises(ValueError, match="N: input 'x' must be a finite number"):
            check_finite(bad, "N", "x")


def test_parse_index_list():
    assert parse_index_list("50, 150,250", 0, 999, "N", "steps", what="noise step") == (50, 150, 250)
    assert parse_index_list("5-8; 9, 5", 0, 11, "N", "blocks") == (5, 6, 7, 8, 9)
    assert parse_index_list("output.4, 6-7", 0, 11, "N", "b", prefixes=("output.",)) == (4, 6, 7)
    assert parse_index_list(" none ", 0, 11, "N", "b", allow_none=True) == ()
    with pytest.raises(ValueError, match="has 'none'"):
        parse_index_list("none", 0, 11, "N", "b")
    with pytest.raises(ValueError, match="names no decoder block"):
        parse_index_list(" , ", 0, 11, "N", "b")
    with pytest.raises(ValueError, match=r"N: input 'b' names decoder block 12, which does not exist; use 0-11\."):
        parse_index_list("4-12", 0, 11, "N", "b")
    for bad in ("", "a", "4-x", "-3"):
        with pytest.raises(ValueError, match="N: input 'b'"):
            parse_index_list(bad, 0, 11, "N", "b")


def test_lazy_node_list_is_the_nodes_modules_list(comfy):
    import importlib

    import plugkit.nodes.segmentation as seg

    nodes = seg.NODES  # through node_list_getattr on first access, then a plain attribute
    assert nodes is importlib.import_module("plugkit.nodes.segmentation.nodes").NODES
    assert [n.__name__ for n in nodes][:2] == ["PlugKitFeatureSegmenterTrain", "PlugKitFeatureSegment"]
    assert seg.__dict__["NODES"] is nodes
    with pytest.raises(AttributeError):
        seg.NOT_THERE


def test_run_scope_sets_state_for_the_run_only():
    from plugkit.nodes.run_state import run_scope, run_state

    shared_patch = object()
    original = {"transformer_options": {"patches": {"output_block_patch": [shared_patch]}}, "x": 1}

    class Guider:
        model_options = original

    guider = Guider()
    with run_scope(guider, "k", "state") as state:
        assert state == "state"
        assert run_state(guider.model_options, "k") == "state"
        assert run_state(guider.model_options["transformer_options"], "k") == "state"
        assert guider.model_options["transformer_options"]["patches"]["output_block_patch"][0] is shared_patch
    assert guider.model_options is original and "k" not in original["transformer_options"]
    with pytest.raises(RuntimeError):
        with run_scope(guider, "k", "state"):
            raise RuntimeError("the run failed")
    assert guider.model_options is original and run_state(original, "k") is None
    assert run_state(None, "k") is None
