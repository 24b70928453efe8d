"""PlugKit's nodes: one sub-package per technique (math modules are comfy-free; node glue is thin)."""
