"""Feature segmentation nodes: train, segment, save, load.

Technique: Baranchuk, Rubachev, Voynov, Khrulkov, Babenko, "Label-Efficient Semantic Segmentation
with Diffusion Models" (ICLR 2022); official code yandex-research/ddpm-segmentation (MIT). This
pack's code is written from the paper and that code, not copied. The math lives in
``pixel_classifier`` / ``segmenter``; the U-Net hooks in ``hooks``; the model runs in ``runs``; the
models folder in ``model_folders``; this file is glue.
"""
from __future__ import annotations

import logging

from ..comfy_io import io, ui
from ..node_errors import check_choice
from . import model_folders, runs
from . import pixel_classifier as pc
from .model_folders import FOLDER, list_segmenters
from .segmenter import DEFAULT_STEPS, Segmenter

log = logging.getLogger(__name__)

CATEGORY = "PlugKit/Segmentation"
SegmenterType = io.Custom("PLUGKIT_SEGMENTER")
RESOLUTIONS = ("latent", "image")


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
        images = runs.check_images(images, node)
        labels, palette, source = runs.training_labels(images, masks, label_image, node)
        check_choice(resolution, RESOLUTIONS, node, "resolution")
        step_list, block_list = runs.feature_recipe(model, steps, blocks, node)
        segmenter, report = runs.train_segmenter(model, vae, images, labels, palette, source, step_list, block_list,
                                                 conditioning, int(ensemble_size), resolution, int(batch_size),
                                                 int(max_epochs), int(seed), node)
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
        return io.NodeOutput(*runs.segment_images(segmenter, model, vae, runs.check_images(images, node),
                                                  int(class_index), node))


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
        path = model_folders.save_segmenter(segmenter, name, bool(overwrite), node)
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
        return io.NodeOutput(model_folders.load_segmenter(str(segmenter_name), "PlugKitLoadSegmenter"))


NODES = [PlugKitFeatureSegmenterTrain, PlugKitFeatureSegment, PlugKitSaveSegmenter, PlugKitLoadSegmenter]
