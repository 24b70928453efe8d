"""Regenerate every shipped workflow, its input images and its thumbnail with ONE server start:
``python -m tools.workflows_all`` (each ``tools.workflows_<technique>`` still works alone).

The builders lay widgets out from the live ``/object_info``, so run this after a node input changes.
"""
from __future__ import annotations

import logging

from .host import REPO

log = logging.getLogger("plugkit.workflows_all")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from . import (thumbnails, workflows_diff_plugin, workflows_differential_diffusion, workflows_freeu, workflows_pnp,
                   workflows_segmentation)
    from .server import generator_object_info
    from .test_models import prepare_model_files

    for module in (workflows_diff_plugin, workflows_differential_diffusion, workflows_pnp, workflows_segmentation):
        module.write_images()
    info = generator_object_info("all", model_files=prepare_model_files())
    written = workflows_freeu.write(info)
    written.append(workflows_pnp.build(info).save(REPO / "workflows" / workflows_pnp.WORKFLOW))
    written.append(workflows_differential_diffusion.build(info).save(
        REPO / "workflows" / workflows_differential_diffusion.WORKFLOW))
    written.append(workflows_segmentation.build(info).save(REPO / "workflows" / workflows_segmentation.WORKFLOW))
    for name, build in ((workflows_diff_plugin.DERAIN_WORKFLOW, workflows_diff_plugin.build_derain),
                        (workflows_diff_plugin.SELECTOR_WORKFLOW, workflows_diff_plugin.build_selector)):
        written.append(build(info).save(REPO / "workflows" / name))
    written += thumbnails.write_all()
    for p in written:
        log.info("wrote %s", p.relative_to(REPO))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
