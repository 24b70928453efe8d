"""Diff-Plugin (Liu et al., CVPR 2024)."""
NODES: list = []
