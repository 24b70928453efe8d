"""Template-browser thumbnails: ``workflows/<name>.jpg``, a diagram of each shipped workflow.

``python -m tools.workflows.thumbnails`` (also run by ``python -m tools.workflows``). The diagram is the
graph itself, drawn from the UI file: one box per node at its canvas position (PlugKit nodes
highlighted), its title, and the links between them. No model output is shown (we ship no weights).
ComfyUI's template browser shows ``/api/workflow_templates/<pack>/<name>.jpg`` beside ``<name>.json``.
"""
from __future__ import annotations

import json
import textwrap
import logging
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from tools.harness.host import REPO

log = logging.getLogger("plugkit.thumbnails")

WIDTH, HEIGHT = 512, 384
TITLES = {
    "freeu_sd15": "FreeU: SD1.5, off vs on",
    "freeu_sdxl": "FreeU: SDXL, off vs on",
    "differential_diffusion_sd15": "Differential Diffusion: a change map",
    "pnp_sd15": "Plug-and-Play: invert, inject",
    "diff_plugin_derain": "Diff-Plugin: derain",
    "diff_plugin_selector": "Diff-Plugin: Plugin-Selector",
    "segmentation_sd15": "Segmentation: masks from features",
}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def thumbnail(ui: dict, title: str) -> Image.Image:
    img = Image.new("RGB", (WIDTH, HEIGHT), (32, 34, 40))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, WIDTH, 44], fill=(52, 56, 66))
    d.text((12, 10), title, fill=(245, 245, 245), font=_font(20))
    nodes = [n for n in ui["nodes"] if n.get("pos")]
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] for n in nodes)
    x1 = max(n["pos"][0] + n.get("size", [320, 120])[0] for n in nodes)
    y1 = max(n["pos"][1] + min(n.get("size", [320, 120])[1], 200) for n in nodes)
    pad, top = 12, 56
    scale = min((WIDTH - 2 * pad) / (x1 - x0), (HEIGHT - top - pad) / (y1 - y0))
    box = {}
    for n in nodes:
        w, h = n.get("size", [320, 120])
        bx = pad + (n["pos"][0] - x0) * scale
        by = top + (n["pos"][1] - y0) * scale
        box[n["id"]] = (bx, by, bx + w * scale, by + min(h, 200) * scale)
    by_id = {n["id"]: n for n in nodes}
    for link in ui.get("links", []):
        _, src, _, dst, _, _ = link[:6]
        if src in box and dst in box:
            a, b = box[src], box[dst]
            d.line([(a[2], (a[1] + a[3]) / 2), (b[0], (b[1] + b[3]) / 2)], fill=(130, 150, 180), width=2)
    font = _font(10)
    for nid, (ax, ay, bx, by) in box.items():
        n = by_id[nid]
        plugkit = n["type"].startswith("PlugKit")
        d.rounded_rectangle([ax, ay, bx, by], radius=4, fill=(70, 52, 110) if plugkit else (58, 62, 72),
                            outline=(190, 150, 255) if plugkit else (110, 116, 128), width=2)
        label = (n.get("title") or n["type"]).replace("PlugKit", "")
        limit = max(6, int((bx - ax - 6) / (font.size * 0.55 if hasattr(font, "size") else 6)))
        lines = textwrap.wrap(label, limit)[:max(1, int((by - ay - 4) // (getattr(font, "size", 11) + 2)))]
        d.multiline_text((ax + 4, ay + 3), "\n".join(lines), fill=(240, 240, 240), font=font, spacing=2)
    d.text((12, HEIGHT - 18), "PlugKit nodes in purple", fill=(170, 170, 190), font=_font(11))
    return img


def write_all(directory: Path = REPO / "workflows") -> list[Path]:
    paths = []
    for wf in sorted(directory.glob("*.json")):
        ui = json.loads(wf.read_text())
        out = wf.with_suffix(".jpg")
        thumbnail(ui, TITLES.get(wf.stem, wf.stem)).save(out, quality=88)
        paths.append(out)
    return paths


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for p in write_all():
        log.info("wrote %s", p.relative_to(REPO))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
