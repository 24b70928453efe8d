"""Differential Diffusion (Levin & Fried, exx8/differential-diffusion)."""
NODES: list = []
