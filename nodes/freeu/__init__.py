"""FreeU (Si et al., arXiv 2309.11497)."""
NODES: list = []
