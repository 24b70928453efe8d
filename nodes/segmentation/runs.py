"""Feature segmentation's model runs (ComfyUI side): checks, VAE encoding, feature extraction
(``hooks``), training the ensemble and segmenting (``pixel_classifier``), the training report."""
from __future__ import annotations

import logging
import time

import torch

import comfy.model_management
import comfy.utils

from . import hooks
from . import pixel_classifier as pc
from ..block_lists import parse_index_list
from .segmenter import DEFAULT_BLOCKS, Segmenter

log = logging.getLogger(__name__)

MIN_SIZE = 64


def check_images(images, node: str, name: str = "images") -> torch.Tensor:
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[-1] < 3:
        raise ValueError(f"{node}: input '{name}' must be an IMAGE batch (batch, height, width, 3).")
    b, h, w, _ = images.shape
    if h % 8 or w % 8 or h < MIN_SIZE or w < MIN_SIZE:
        raise ValueError(f"{node}: input '{name}' is {w}x{h} px; use a size that is a multiple of 8 and at least "
                         f"{MIN_SIZE} px (e.g. resize with 'Upscale Image' first).")
    if not torch.isfinite(images).all():
        raise ValueError(f"{node}: input '{name}' contains NaN or inf.")
    return images[..., :3].float()


def model_info(model, latent: torch.Tensor, node: str):
    unet = hooks.unet_of(model, node)
    channels = int(latent.shape[1])
    if channels != int(unet.in_channels):
        raise ValueError(f"{node}: input 'vae' makes {channels}-channel latents but the U-Net takes {unet.in_channels} "
                         "channels; connect the VAE of the same checkpoint family.")
    return unet, channels


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """The raw VAE latents of an IMAGE batch, on the CPU in float32. Without an autograd graph even
    when called outside ComfyUI's inference mode (a script, another node calling this one): the
    graph kept about 3 GB per 512 px image alive on a CPU."""
    return vae.encode(images).float().cpu()


def progress(total: int):
    bar = comfy.utils.ProgressBar(total)

    def update(i, n):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(i, n)
    return update


def segment(segmenter: Segmenter, features: torch.Tensor, out_hw) -> tuple[torch.Tensor, torch.Tensor]:
    labels, unc = [], []
    for f in features:
        lab, u = pc.predict(segmenter.classifiers, f, out_hw)
        labels.append(lab)
        unc.append(u)
    return torch.stack(labels), torch.stack(unc)


def training_labels(images: torch.Tensor, masks, label_image, node: str) -> tuple[torch.Tensor, list, str]:
    """(labels (B, H, W) long, palette, source) from exactly one of ``masks`` or ``label_image``."""
    b, height, width, _ = images.shape
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
    return labels, palette, source


def feature_recipe(model, steps: str, blocks: str, node: str) -> tuple[tuple, tuple]:
    """(noise steps, decoder blocks) from the node's text inputs; blocks default by U-Net family."""
    n_blocks = len(hooks.unet_of(model, node).output_blocks)
    step_list = parse_index_list(steps, 0, 999, node, "steps", what="noise step")
    if str(blocks).strip():
        block_list = parse_index_list(blocks, 0, n_blocks - 1, node, "blocks")
    elif n_blocks in DEFAULT_BLOCKS:
        block_list = DEFAULT_BLOCKS[n_blocks]
    else:
        raise ValueError(f"{node}: this U-Net has {n_blocks} decoder blocks; the defaults cover SD1.x/2.x (12) and "
                         "SDXL (9). Set 'blocks' explicitly.")
    return step_list, block_list


def train_segmenter(model, vae, images: torch.Tensor, labels: torch.Tensor, palette: list, source: str,
                    step_list: tuple, block_list: tuple, conditioning, ensemble_size: int, resolution: str,
                    batch_size: int, max_epochs: int, seed: int, node: str) -> tuple[Segmenter, str]:
    """Features of the labelled images, the ensemble trained on them, and the report."""
    t0 = time.perf_counter()
    b, height, width, _ = images.shape
    n_blocks = len(hooks.unet_of(model, node).output_blocks)
    cond = conditioning if conditioning else hooks.empty_conditioning(model)
    cond_state = hooks.conditioning_state(cond)
    cond = hooks.conditioning_from_state(cond_state)

    latent = encode(vae, images)
    _, latent_channels = model_info(model, latent, node)
    features, channels = hooks.extract_features(model, latent, step_list, block_list, cond, seed, node,
                                                progress(b * len(step_list)))
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
    pred, _ = segment(segmenter, features, (height, width))
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
    return segmenter, report


def segment_images(segmenter: Segmenter, model, vae, images: torch.Tensor, class_index: int, node: str):
    """(class mask, every class's masks, colour labels, uncertainty) for a checked IMAGE batch."""
    b, height, width, _ = images.shape
    latent = encode(vae, images)
    unet, latent_channels = model_info(model, latent, node)
    segmenter.check_model(hooks.model_family(model), len(unet.output_blocks), latent_channels, node)
    if not 0 <= int(class_index) < segmenter.n_classes:
        raise ValueError(f"{node}: input 'class_index' is {class_index} but the segmenter has classes "
                         f"0-{segmenter.n_classes - 1}.")
    cond = hooks.conditioning_from_state(segmenter.conditioning) if segmenter.conditioning else hooks.empty_conditioning(model)
    features, channels = hooks.extract_features(model, latent, segmenter.steps, segmenter.blocks, cond,
                                                segmenter.seed, node, progress(b * len(segmenter.steps)))
    if tuple(channels) != tuple(segmenter.block_channels):
        raise ValueError(f"{node}: the model's decoder blocks {list(segmenter.blocks)} have {list(channels)} channels but "
                         f"the segmenter was trained on {list(segmenter.block_channels)}; connect the model it was trained with.")
    labels, unc = segment(segmenter, features, (height, width))
    n = segmenter.n_classes
    class_masks = torch.stack([(labels == c).float() for c in range(n)], dim=1).reshape(b * n, height, width)
    mask = (labels == int(class_index)).float()
    colour = torch.stack([pc.colourise(lab, segmenter.palette) for lab in labels])
    out_device = comfy.model_management.intermediate_device()
    return mask.to(out_device), class_masks.to(out_device), colour.to(out_device), unc.float().to(out_device)
