"""Regenerate the shipped workflows, their input pictures and their thumbnails with ONE server start:
``python -m tools.workflows [technique ...]`` (default: every technique).

The builders lay widgets out from the live ``/object_info``, so run this after a node input changes.
"""
from __future__ import annotations

import argparse
import importlib
import logging

from tools.fixtures.model_files import prepare_model_files
from tools.harness.host import REPO
from tools.harness.server import generator_object_info
from tools.workflows import thumbnails

log = logging.getLogger("plugkit.workflows")

TECHNIQUES = ("freeu", "diff_plugin", "pnp", "differential_diffusion", "segmentation")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("techniques", nargs="*", help=f"a subset of {', '.join(TECHNIQUES)}")
    names = parser.parse_args(argv).techniques or list(TECHNIQUES)
    unknown = sorted(set(names) - set(TECHNIQUES))
    if unknown:
        parser.error(f"no workflows for {unknown}; have {', '.join(TECHNIQUES)}")
    modules = [importlib.import_module(f"tools.workflows.{name}") for name in names]
    for module in modules:
        if hasattr(module, "write_images"):
            module.write_images()
    info = generator_object_info(model_files=prepare_model_files())
    written = [wf.save(REPO / "workflows" / file) for module in modules for file, wf in module.workflows(info).items()]
    written += thumbnails.write_all()
    for path in written:
        log.info("wrote %s", path.relative_to(REPO))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
