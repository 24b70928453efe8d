"""Writes the README's node reference from the nodes' own schemas (``python -m tools.node_docs.node_reference``).

One section per node: what it does, its inputs (type, default, tooltip), outputs, supported model
families, and its help page. A test checks the README is current, so the reference cannot go stale.
"""
from __future__ import annotations

import re

from tools.harness.host import REPO, setup_in_process

START, END = "<!-- node-reference:start -->", "<!-- node-reference:end -->"

# Model families per technique folder (what the technique needs of the model).
FAMILIES = {
    "freeu": "U-Net models: SD1.x, SD2.x, SDXL, the SDXL refiner, and video U-Nets built on them "
             "(SVD, AnimateDiff-patched SD1.5). DiT models (Flux, SD3, ...) are refused with a clear error, or passed through unchanged with a warning (`other_models`).",
    "diff_plugin": "SD 1.x U-Nets (cross-attention context 768; the plugins were trained on SD 1.4). "
                   "Other families are refused with a clear error.",
    "pnp": "U-Net models: SD1.x, SD2.x (epsilon and v-prediction), SDXL (documented block mapping). "
           "Non-U-Net models are refused with a clear error.",
    "differential_diffusion": "Every model ComfyUI samples (SD1.x, SD2.x, SDXL, SD3, Flux, other DiTs, "
                              "inpainting models).",
    "segmentation": "U-Net models: SD1.x, SD2.x, SDXL (documented block mapping; tested on SD1.5-structured "
                    "U-Nets). Non-U-Net models are refused with a clear error.",
}


def _fmt_default(v) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return f"`{v!r}`" if v else "`''`"
    return f"`{v}`"


def render(nodes) -> str:
    out = []
    for node in nodes:
        schema = node.GET_SCHEMA()
        info = node.GET_NODE_INFO_V1()
        technique = node.__module__.split(".")[-2]
        out.append(f"### {schema.display_name or schema.node_id} (`{schema.node_id}`)\n")
        out.append(f"Category `{schema.category}`. "
                   + (schema.description.strip() + " " if schema.description else "")
                   + f"Help page: [js/docs/{schema.node_id}.md](js/docs/{schema.node_id}.md).\n")
        out.append("| input | type | default | description |\n|---|---|---|---|")
        for section in ("required", "optional"):
            for name, spec in (info["input"].get(section) or {}).items():
                typ = spec[0]
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if isinstance(typ, list) or typ == "COMBO":
                    choices = typ if isinstance(typ, list) else opts.get("options", [])
                    shown = ", ".join(f"`{c}`" for c in choices[:8]) + (", ..." if len(choices) > 8 else "")
                    typ = f"COMBO ({shown})" if choices else "COMBO"
                tip = str(opts.get("tooltip", "")).replace("\n", " ").replace("|", "\\|")
                opt = " (optional)" if section == "optional" else ""
                out.append(f"| `{name}`{opt} | {typ} | {_fmt_default(opts.get('default'))} | {tip} |")
        outs = ", ".join(f"`{n}` ({t})" for t, n in zip(info["output"], info["output_name"]))
        out.append(f"\n**Outputs:** {outs or 'none (UI only)'}.\n")
        out.append(f"**Models:** {FAMILIES.get(technique, 'see the help page')}\n")
    return "\n".join(out).rstrip() + "\n"


def updated_readme(text: str, reference: str) -> str:
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    return pattern.sub(lambda _: f"{START}\n{reference}{END}", text)


def current_reference() -> str:
    from plugkit.nodes.extension import all_nodes

    return render(all_nodes())


def main() -> int:
    setup_in_process()
    readme = REPO / "README.md"
    readme.write_text(updated_readme(readme.read_text(), current_reference()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
