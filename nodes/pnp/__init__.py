"""Plug-and-Play diffusion features (Tumanyan et al., CVPR 2023)."""
NODES: list = []
