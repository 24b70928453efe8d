"""Feature segmentation nodes: train, segment, save, load.

Technique: Baranchuk, Rubachev, Voynov, Khrulkov, Babenko, "Label-Efficient Semantic Segmentation
with Diffusion Models" (ICLR 2022); official code yandex-research/ddpm-segmentation (MIT). This
pack's code is written from the paper and that code, not copied. The math lives in
``pixel_classifier`` / ``segmenter``; the U-Net hooks in ``hooks``; this file is glue.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

import comfy.model_management
import comfy.utils

from ..comfy_io import io, ui
from . import hooks
from . import pixel_classifier as pc
from ..block_lists import parse_index_list
from ..node_errors import check_choice
from .segmenter import DEFAULT_BLOCKS, DEFAULT_STEPS, Segmenter, safe_child

log = logging.getLogger(__name__)

CATEGORY = "PlugKit/Segmentation"
FOLDER = "plugkit_segmenters"
SegmenterType = io.Custom("PLUGKIT_SEGMENTER")
RESOLUTIONS = ("latent", "image")
MIN_SIZE = 64


def segmenter_folders() -> list[str]:
    """Register ``models/plugkit_segmenters`` with folder_paths (idempotent, lazy, never at import)
    and return every folder configured for it (extra_model_paths.yaml entries included)."""
    import folder_paths

    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
    return folder_paths.get_folder_paths(FOLDER)


def list_segmenters() -> list[str]:
    found: set[str] = set()
    try:
        for base in segmenter_folders():
            base_path = Path(base)
            if base_path.is_dir():
                found.update(p.relative_to(base_path).as_posix() for p in base_path.rglob("*.safetensors"))
    except Exception as exc:  # listing must never break the node list
        log.warning("PlugKit segmentation: could not list models/%s: %s", FOLDER, exc)
    return sorted(found)


def _check_images(images, node: str, name: str = "images") -> torch.Tensor:
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[-1] < 3:
        raise ValueError(f"{node}: input '{name}' must be an IMAGE batch (batch, height, width, 3).")
    b, h, w, _ = images.shape
    if h % 8 or w % 8 or h < MIN_SIZE or w < MIN_SIZE:
        raise ValueError(f"{node}: input '{name}' is {w}x{h} px; use a size that is a multiple of 8 and at least "
                         f"{MIN_SIZE} px (e.g. resize with 'Upscale Image' first).")
    if not torch.isfinite(images).all():
        raise ValueError(f"{node}: input '{name}' contains NaN or inf.")
    return images[..., :3].float()


def _model_info(model, latent: torch.Tensor, node: str):
    unet = hooks.unet_of(model, node)
    channels = int(latent.shape[1])
    if channels != int(unet.in_channels):
        raise ValueError(f"{node}: input 'vae' makes {channels}-channel latents but the U-Net takes {unet.in_channels} "
                         "channels; connect the VAE of the same checkpoint family.")
    return unet, channels


def _encode(vae, images: torch.Tensor) -> torch.Tensor:
    return vae.encode(images).float().cpu()


def _progress(total: int):
    bar = comfy.utils.ProgressBar(total)

    def update(i, n):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(i, n)
    return update


def _segment(segmenter: Segmenter, features: torch.Tensor, out_hw) -> tuple[torch.Tensor, torch.Tensor]:
    labels, unc = [], []
    for f in features:
        lab, u = pc.predict(segmenter.classifiers, f, out_hw)
        labels.append(lab)
        unc.append(u)
    return torch.stack(labels), torch.stack(unc)


class PlugKitFeatureSegmenterTrain(io.ComfyNode):
    """Trains an ensemble of pixel classifiers on the U-Net's decoder features of a few labelled images."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PlugKitFeatureSegmenterTrain",
            display_name="Train Feature Segmenter (PlugKit)",
            category=CATEGORY,
            description=(
                "Label-efficient segmentation (Baranchuk et al., ICLR 2022): learns to segment from a few images "
                "with painted masks, using the U-Net's decoder features at a few noise levels and an ensemble of "
                "small pixel classifiers."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A U-Net checkpoint's MODEL (SD1.x, SD2.x, SDXL). Use the same one when segmenting."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE: encodes the images to latents."),
                io.Image.Input("images", tooltip="The training images (2-5 are typical), all the same size, a multiple of 8 px."),
                io.Mask.Input("masks", optional=True,
                              tooltip="One class: a mask per image (e.g. painted in the mask editor); white = the class, black = background. Connect this or 'label_image'."),
                io.Image.Input("label_image", optional=True,
                               tooltip="Several classes: a label image per training image, one flat colour per class (no anti-aliasing). Connect this or 'masks'."),
                io.String.Input("steps", default=", ".join(map(str, DEFAULT_STEPS)),
                                tooltip="Noise steps t (0-999) at which the U-Net is read, one U-Net pass each. Official: 50, 150, 250."),
                io.String.Input("blocks", default="",
                                tooltip="Decoder (output) blocks whose outputs are the features, e.g. '5-9'. Empty: family default (SD1.x/2.x: 5, 6, 7, 8, 9; SDXL: 2-6), mapped from the official 5, 6, 7, 8, 12."),
                io.Int.Input("ensemble_size", default=10, min=1, max=32,
                             tooltip="Number of pixel classifiers voting (official: 10). Their disagreement is the uncertainty."),
                io.Combo.Input("resolution", options=list(RESOLUTIONS), default="latent",
                               tooltip="latent: one training sample per latent cell (8x8 px; its majority label), fast on CPU. image: every image pixel with bilinearly upsampled features (the official recipe), 64x more samples."),
                io.Int.Input("batch_size", default=pc.OFFICIAL_BATCH, min=2, max=65536,
                             tooltip="Pixels per optimisation step (official: 64)."),
                io.Int.Input("max_epochs", default=pc.OFFICIAL_MAX_EPOCHS, min=1, max=1000,
                             tooltip="Upper bound on epochs (official: 100); the official early stop usually ends training after about 5."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the fixed noise (shared by every image, as the official share_noise) and of the classifiers."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Optional text conditioning for the U-Net passes (e.g. CLIP Text Encode with an empty text). Unconnected: a zero text context. Kept in the segmenter and reused when segmenting."),
            ],
            outputs=[
                SegmenterType.Output(display_name="segmenter", tooltip="The trained segmenter, for Feature Segment and Save Segmenter."),
                io.String.Output(display_name="report", tooltip="Per-class pixel accuracy on the training pixels, feature size and times."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, images, masks=None, label_image=None, steps="50, 150, 250", blocks="",
                ensemble_size=10, resolution="latent", batch_size=64, max_epochs=100, seed=0,
                conditioning=None) -> io.NodeOutput:
        node = "PlugKitFeatureSegmenterTrain"
        t0 = time.perf_counter()
        images = _check_images(images, node)
        b, height, width, _ = images.shape
        unet = hooks.unet_of(model, node)
        n_blocks = len(unet.output_blocks)
        if (masks is None) == (label_image is None):
            raise ValueError(f"{node}: connect exactly one of 'masks' (one class) or 'label_image' (several classes).")
        if masks is not None:
            if masks.dim() == 2:
                masks = masks[None]
            if masks.dim() != 3 or masks.shape[0] != b:
                raise ValueError(f"{node}: input 'masks' is {tuple(masks.shape)} but 'images' needs ({b}, {height}, {width}): "
                                 "one mask per image.")
            if tuple(masks.shape[1:]) != (height, width):
                # A mask painted at another size (the image was scaled after loading): nearest keeps it hard-edged.
                log.info("%s: input 'masks' is %dx%d px, the images %dx%d; masks resized (nearest) to the images.",
                         node, masks.shape[2], masks.shape[1], width, height)
                masks = torch.nn.functional.interpolate(masks[:, None].float(), size=(height, width),
                                                        mode="nearest-exact")[:, 0]
            masks = masks.float().cpu()
            if not torch.isfinite(masks).all():
                raise ValueError(f"{node}: input 'masks' contains NaN or inf.")
            labels, palette, source = pc.labels_from_masks(masks), [(0, 0, 0), (255, 255, 255)], "masks"
            if not bool((labels == 1).any()) or bool((labels == 1).all()):
                raise ValueError(f"{node}: input 'masks' has no painted or no unpainted pixel; paint the class on "
                                 "part of each image (white = the class).")
        else:
            if tuple(label_image.shape[:3]) != (b, height, width):
                raise ValueError(f"{node}: input 'label_image' is {tuple(label_image.shape[:3])} but 'images' needs "
                                 f"({b}, {height}, {width}): one label image per image, at the image size.")
            try:
                labels, palette = pc.labels_from_colours(label_image.float().cpu())
            except ValueError as exc:
                raise ValueError(f"{node}: input 'label_image' {exc}.") from None
            source = "label_image"
        check_choice(resolution, RESOLUTIONS, node, "resolution")
        step_list = parse_index_list(steps, 0, 999, node, "steps", what="noise step")
        if str(blocks).strip():
            block_list = parse_index_list(blocks, 0, n_blocks - 1, node, "blocks")
        elif n_blocks in DEFAULT_BLOCKS:
            block_list = DEFAULT_BLOCKS[n_blocks]
        else:
            raise ValueError(f"{node}: this U-Net has {n_blocks} decoder blocks; the defaults cover SD1.x/2.x (12) and "
                             "SDXL (9). Set 'blocks' explicitly.")
        cond = conditioning if conditioning else hooks.empty_conditioning(model)
        cond_state = hooks.conditioning_state(cond)
        cond = hooks.conditioning_from_state(cond_state)

        latent = _encode(vae, images)
        _, latent_channels = _model_info(model, latent, node)
        features, channels = hooks.extract_features(model, latent, step_list, block_list, cond, seed, node,
                                                    _progress(b * len(step_list)))
        t_feat = time.perf_counter() - t0
        n_classes = len(palette)
        h, w = features.shape[-2:]
        target = pc.downsample_labels(labels, (h, w), n_classes) if resolution == "latent" else labels
        device = comfy.model_management.get_torch_device()
        data = pc.PixelSet(features.to(device), target.to(device))
        models, stats = pc.ensemble(data, n_classes, features.shape[1], int(ensemble_size), int(seed),
                                    batch_size=int(batch_size), max_epochs=int(max_epochs), device=device,
                                    check=comfy.model_management.throw_exception_if_processing_interrupted)
        segmenter = Segmenter(family=hooks.model_family(model), decoder_blocks=n_blocks, latent_channels=latent_channels,
                              steps=step_list, blocks=block_list, block_channels=channels, palette=palette,
                              classifiers=models, resolution=resolution, seed=int(seed), conditioning=cond_state,
                              source=source)
        pred, _ = _segment(segmenter, features, (height, width))
        acc = pc.pixel_accuracy(pred, labels, n_classes)
        lines = [f"Feature segmenter: {segmenter.family}, {n_classes} classes, {b} images {width}x{height}, steps "
                 f"{list(step_list)}, blocks {list(block_list)}, {features.shape[1]} features per latent cell "
                 f"({features.numel() * 4 / 2**20:.1f} MiB of features)",
                 f"{len(models)} classifiers on {stats['pixels']} {resolution} pixels, iterations "
                 f"{min(stats['iterations'])}-{max(stats['iterations'])}",
                 "Pixel accuracy on the training images (majority vote, image resolution):"]
        for c, a in enumerate(acc):
            lines.append(f"  class {c} {palette[c]}: " + ("absent" if a is None else f"{100 * a:.1f}%"))
        lines.append(f"Time: features {t_feat:.1f} s, training {stats['seconds']:.1f} s, "
                     f"total {time.perf_counter() - t0:.1f} s")
        report = "\n".join(lines)
        log.info("%s: %s", node, report)
        return io.NodeOutput(segmenter, report, ui=ui.PreviewText(report))


class PlugKitFeatureSegment(io.ComfyNode):
    """Segments images with a trained feature segmenter."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PlugKitFeatureSegment",
            display_name="Feature Segment (PlugKit)",
            category=CATEGORY,
            description=(
                "Segments a batch of images with a trained feature segmenter: a mask of one class, masks of every "
                "class, a colour label image and the ensemble's uncertainty."
            ),
            inputs=[
                SegmenterType.Input("segmenter", tooltip="From Train Feature Segmenter or Load Segmenter."),
                io.Model.Input("model", tooltip="The MODEL the segmenter was trained with (same checkpoint)."),
                io.Vae.Input("vae", tooltip="The VAE the segmenter was trained with."),
                io.Image.Input("images", tooltip="Images to segment (a batch or video frames), a multiple of 8 px; best at the training size."),
                io.Int.Input("class_index", default=1, min=0, max=63,
                             tooltip="The class returned as 'mask' (masks: 1 = the painted class; label images: classes are numbered by colour, black first)."),
            ],
            outputs=[
                io.Mask.Output(display_name="mask", tooltip="One mask per image: 1 where the majority vote is 'class_index'."),
                io.Mask.Output(display_name="class_masks", tooltip="Every class for every image: image i's class c at index i * classes + c."),
                io.Image.Output(display_name="labels", tooltip="The segmentation in the training colours."),
                io.Mask.Output(display_name="uncertainty", tooltip="The ensemble's disagreement per pixel, 0..1 (official Jensen-Shannon score divided by ln(classes))."),
            ],
        )

    @classmethod
    def execute(cls, segmenter, model, vae, images, class_index=1) -> io.NodeOutput:
        node = "PlugKitFeatureSegment"
        if not isinstance(segmenter, Segmenter):
            raise TypeError(f"{node}: input 'segmenter' must come from Train Feature Segmenter or Load Segmenter "
                            f"(got {type(segmenter).__name__}).")
        images = _check_images(images, node)
        b, height, width, _ = images.shape
        latent = _encode(vae, images)
        unet, latent_channels = _model_info(model, latent, node)
        segmenter.check_model(hooks.model_family(model), len(unet.output_blocks), latent_channels, node)
        if not 0 <= int(class_index) < segmenter.n_classes:
            raise ValueError(f"{node}: input 'class_index' is {class_index} but the segmenter has classes "
                             f"0-{segmenter.n_classes - 1}.")
        cond = hooks.conditioning_from_state(segmenter.conditioning) if segmenter.conditioning else hooks.empty_conditioning(model)
        features, channels = hooks.extract_features(model, latent, segmenter.steps, segmenter.blocks, cond,
                                                    segmenter.seed, node, _progress(b * len(segmenter.steps)))
        if tuple(channels) != tuple(segmenter.block_channels):
            raise ValueError(f"{node}: the model's decoder blocks {list(segmenter.blocks)} have {list(channels)} channels but "
                             f"the segmenter was trained on {list(segmenter.block_channels)}; connect the model it was trained with.")
        labels, unc = _segment(segmenter, features, (height, width))
        n = segmenter.n_classes
        class_masks = torch.stack([(labels == c).float() for c in range(n)], dim=1).reshape(b * n, height, width)
        mask = (labels == int(class_index)).float()
        colour = torch.stack([pc.colourise(lab, segmenter.palette) for lab in labels])
        out_device = comfy.model_management.intermediate_device()
        return io.NodeOutput(mask.to(out_device), class_masks.to(out_device), colour.to(out_device), unc.float().to(out_device))


class PlugKitSaveSegmenter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PlugKitSaveSegmenter",
            display_name="Save Segmenter (PlugKit)",
            category=CATEGORY,
            description=f"Saves a feature segmenter as models/{FOLDER}/<name>.safetensors.",
            inputs=[
                SegmenterType.Input("segmenter", tooltip="From Train Feature Segmenter."),
                io.String.Input("name", default="my_segmenter",
                                tooltip=f"File name inside models/{FOLDER} ('.safetensors' is added); sub-folders like 'faces/eyes' work, '..' and absolute paths are refused."),
                io.Boolean.Input("overwrite", default=True, tooltip="Replace an existing file of that name."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="The file written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, segmenter, name="my_segmenter", overwrite=True) -> io.NodeOutput:
        node = "PlugKitSaveSegmenter"
        if not isinstance(segmenter, Segmenter):
            raise TypeError(f"{node}: input 'segmenter' must come from Train Feature Segmenter (got {type(segmenter).__name__}).")
        name = str(name).strip()
        if not name.endswith(".safetensors"):
            name += ".safetensors"
        base = segmenter_folders()[0]
        path = safe_child(base, name)
        if path is None:
            raise ValueError(f"{node}: input 'name' is {name!r}; use a plain name inside models/{FOLDER} "
                             "(letters, digits, '_', '-', optional sub-folders; no '..' or absolute paths).")
        if path.exists() and not overwrite:
            raise ValueError(f"{node}: '{name}' already exists in {base}; pick another name or enable 'overwrite'.")
        segmenter.save(path)
        log.info("%s: saved %r to %s", node, segmenter, path)
        return io.NodeOutput(str(path), ui=ui.PreviewText(f"saved {path}"))


class PlugKitLoadSegmenter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PlugKitLoadSegmenter",
            display_name="Load Segmenter (PlugKit)",
            category=CATEGORY,
            description=f"Loads a feature segmenter saved under models/{FOLDER} (extra_model_paths.yaml: '{FOLDER}:').",
            inputs=[io.Combo.Input("segmenter_name", options=list_segmenters(),
                                   tooltip=f"A .safetensors file under models/{FOLDER}.")],
            outputs=[SegmenterType.Output(display_name="segmenter", tooltip="The segmenter, for Feature Segment.")],
        )

    @classmethod
    def execute(cls, segmenter_name) -> io.NodeOutput:
        node = "PlugKitLoadSegmenter"
        for base in segmenter_folders():
            path = safe_child(base, str(segmenter_name))
            if path is None:
                raise ValueError(f"{node}: input 'segmenter_name' is {segmenter_name!r}; only names inside models/{FOLDER} "
                                 "are accepted ('..' and absolute paths are refused).")
            if path.is_file():
                try:
                    return io.NodeOutput(Segmenter.load(path))
                except ValueError as exc:
                    raise ValueError(f"{node}: input 'segmenter_name': {exc}; save segmenters with Save Segmenter.") from None
        raise ValueError(f"{node}: input 'segmenter_name': '{segmenter_name}' not found under models/{FOLDER} "
                         f"({', '.join(segmenter_folders())}); save one with Save Segmenter and refresh.")


NODES = [PlugKitFeatureSegmenterTrain, PlugKitFeatureSegment, PlugKitSaveSegmenter, PlugKitLoadSegmenter]
