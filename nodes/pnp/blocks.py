"""The U-Net decoder blocks PnP injects into: model checks, family defaults, the block inputs'
parsing and checks. Imports ComfyUI's U-Net classes only (to recognise its blocks)."""
from __future__ import annotations

from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel

from ..block_lists import parse_index_list

# Family defaults (decoder = ComfyUI ``output_blocks``). SD1.x/2.x have 12 decoder blocks: the
# official features come from block 4 (diffusers up_blocks[1].resnets[1]) and q/k from blocks 4-11.
# SDXL has 9: the same position (second block of the first 1/4-resolution decoder level) is block
# 1, and the decoder attention except its first block is blocks 1-5.
FAMILY_DEFAULTS = {
    12: {"name": "SD1.x/SD2.x", "features": (4,), "attention": tuple(range(4, 12))},
    9: {"name": "SDXL", "features": (1,), "attention": tuple(range(1, 6))},
}


def unet_of(model, node: str):
    """The model's U-Net, or a clear error for other architectures."""
    diffusion_model = getattr(model.model, "diffusion_model", None)
    if not isinstance(diffusion_model, UNetModel):
        kind = type(diffusion_model).__name__ if diffusion_model is not None else type(model.model).__name__
        raise ValueError(
            f"{node}: input 'model' is a {kind} model; Plug-and-Play injects into U-Net decoder "
            f"blocks and supports SD1.x, SD2.x and SDXL U-Nets only. Connect such a checkpoint."
        )
    return diffusion_model


def model_family(model) -> str:
    """A family label (ComfyUI's model config class, e.g. SD15, SD20, SDXL)."""
    cfg = getattr(model.model, "model_config", None)
    return type(cfg).__name__ if cfg is not None else type(model.model).__name__


def family_defaults(unet, node: str) -> dict:
    n = len(unet.output_blocks)
    if n not in FAMILY_DEFAULTS:
        raise ValueError(
            f"{node}: this U-Net has {n} decoder blocks; the defaults cover SD1.x/SD2.x (12) and SDXL "
            f"(9). Set 'feature_blocks' and 'attention_blocks' explicitly."
        )
    return FAMILY_DEFAULTS[n]


def parse_blocks(text: str, n_blocks: int, node: str, name: str) -> tuple[int, ...]:
    """``"4"``, ``"4-11"``, ``"1, 3-5"``, ``"output.4"`` or ``"none"`` -> sorted decoder block indices."""
    return parse_index_list(str(text or "").lower(), 0, n_blocks - 1, node, name, allow_none=True,
                            prefixes=("output.", "output_blocks."))


def injected_blocks(unet, feature_blocks: str, attention_blocks: str, node: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(feature blocks, attention blocks) from the node's text inputs (empty: the family default), checked."""
    defaults = family_defaults(unet, node) if not (feature_blocks.strip() and attention_blocks.strip()) else {}
    n = len(unet.output_blocks)
    fblocks = parse_blocks(feature_blocks, n, node, "feature_blocks") if feature_blocks.strip() else defaults["features"]
    ablocks = parse_blocks(attention_blocks, n, node, "attention_blocks") if attention_blocks.strip() else defaults["attention"]
    check_blocks(unet, fblocks, ablocks, node)
    return fblocks, ablocks


def feature_map_block(unet, block: int, kind: str, node: str) -> int:
    """The decoder block PlugKitFeatureMap renders (-1: the family's feature block), checked for ``kind``."""
    n = len(unet.output_blocks)
    if block < 0:
        block = family_defaults(unet, node)["features"][0]
    if block >= n:
        raise ValueError(f"{node}: input 'block' is {block} but this U-Net's decoder blocks are 0-{n - 1}.")
    if kind == "features":
        check_blocks(unet, (block,), (), node)
    else:
        check_blocks(unet, (), (block,), node)
    return block


def check_blocks(unet, features: tuple[int, ...], attention: tuple[int, ...], node: str) -> None:
    for i in features:
        if not isinstance(unet.output_blocks[i][0], ResBlock):
            raise ValueError(f"{node}: decoder block {i} does not start with a ResBlock; pick another feature block.")
    for i in attention:
        if not any(isinstance(m, SpatialTransformer) for m in unet.output_blocks[i]):
            raise ValueError(
                f"{node}: decoder block {i} has no self-attention; pick attention blocks among "
                f"{[j for j, b in enumerate(unet.output_blocks) if any(isinstance(m, SpatialTransformer) for m in b)]}."
            )


def attention_depth(unet, block: int) -> int:
    for m in unet.output_blocks[block]:
        if isinstance(m, SpatialTransformer):
            return len(m.transformer_blocks)
    return 0
