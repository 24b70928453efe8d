"""Diff-Plugin fixtures."""
from __future__ import annotations

import pytest

from diff_plugin_testlib import write_released_plugin


@pytest.fixture
def released_plugin(tmp_path):
    return write_released_plugin(tmp_path, "derain", seed=0)
