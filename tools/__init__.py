"""Developer tooling for PlugKit: host bootstrap, test checkpoint, server driver, demo and benchmarks.

Not part of the installed pack (see .comfyignore); nothing here is imported by ComfyUI.
"""
