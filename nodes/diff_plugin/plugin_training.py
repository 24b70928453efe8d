"""Training a Task-Plugin (TPB + SCB) on (degraded, clean) pairs, as the official ``train.py``:
frozen U-Net / VAE / CLIP vision; epsilon MSE at uniform timesteps t in [0, 1000); AdamW (lr 1e-5,
weight decay 1e-2, constant schedule); gradient norm clipped to 1.0 for the SCB and the TPB each.

No ComfyUI import: the frozen models come in as callables (see ``train_nodes.py`` for the glue):
- ``eps_model(x_t, t, context, residuals) -> eps`` (the U-Net with the residuals on its first three skips),
- the pairs arrive pre-encoded (``EncodedPair``: clean and degraded latents, already scaled, and the
  degraded image's CLIP vision last hidden states), since every frozen encoder output is constant.

Deviation from the official script, documented: the latents are the VAE posterior mean (the official
script samples the posterior each step); encoding once makes a CPU/GPU step much cheaper.

Checkpoints: the plugin ``.safetensors`` (metadata ``step``) plus ``<file>.optim.pt`` holding the
AdamW state, both written atomically; ``resume`` continues from them. Every step's randomness comes
from a generator seeded with (seed, step), so a resumed run repeats what an uninterrupted one does
(to float level: kernels may reduce in another order from run to run).
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import plugin_files
from .task_plugin import TaskPlugin, patch_tokens

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
DEGRADED_DIRS = ("input", "degraded", "lq", "conditioning_image", "inputs")
CLEAN_DIRS = ("target", "gt", "clean", "hq", "image", "targets")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 1
    learning_rate: float = 1e-5
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    save_every: int = 250
    seed: int = 0
    num_train_timesteps: int = 1000


@dataclass
class EncodedPair:
    name: str
    clean_latent: torch.Tensor  # [1, 4, h, w], scaled (process_in)
    degraded_latent: torch.Tensor  # [1, 4, h, w], scaled
    clip_hidden: torch.Tensor  # [1, 1 + N, 1024], last layer before post-layernorm


@dataclass
class TrainResult:
    plugin: TaskPlugin
    start_step: int
    end_step: int
    losses: list[float] = field(default_factory=list)
    saved: list[Path] = field(default_factory=list)


def find_pairs(folder: str | os.PathLike) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Pairs ``<folder>/<input|degraded|lq>/X`` with ``<folder>/<target|gt|clean>/X`` (same file stem).
    Returns (pairs, problems) where problems names files without a partner."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"training data folder '{folder}' does not exist")
    sub = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()}
    degraded_dir = next((sub[n] for n in DEGRADED_DIRS if n in sub), None)
    clean_dir = next((sub[n] for n in CLEAN_DIRS if n in sub), None)
    if degraded_dir is None or clean_dir is None:
        raise ValueError(
            f"training data folder '{folder}' needs two sub-folders: the degraded images in one of "
            f"{DEGRADED_DIRS} and the clean ones in one of {CLEAN_DIRS}, paired by file name"
        )

    def images(d: Path) -> dict[str, Path]:
        return {p.stem: p for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}

    degraded, clean = images(degraded_dir), images(clean_dir)
    pairs = [(degraded[k], clean[k]) for k in sorted(degraded) if k in clean]
    problems = [f"{degraded[k].name}: no clean partner" for k in sorted(degraded) if k not in clean]
    problems += [f"{clean[k].name}: no degraded partner" for k in sorted(clean) if k not in degraded]
    return pairs, problems


def load_image(path: Path) -> torch.Tensor:
    """[1, H, W, 3] in [0, 1]; raises on an unreadable file."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None]


def resize_crop(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """Short side to ``resolution`` (bilinear), centre crop to a square: [1, H, W, 3] -> [1, r, r, 3]."""
    x = image.movedim(-1, 1)
    h, w = x.shape[-2:]
    scale = resolution / min(h, w)
    size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return x[:, :, top:top + resolution, left:left + resolution].movedim(1, -1).clamp(0, 1)


def read_pairs(pairs: list[tuple[Path, Path]], resolution: int) -> tuple[list[tuple[str, torch.Tensor, torch.Tensor]], list[str]]:
    """Read and crop each pair. Skipped and reported by file name: an unreadable pair, one whose two images
    differ in size, and one smaller than ``resolution`` on its short side (it would only be upscaled)."""
    good, skipped = [], []
    for degraded_path, clean_path in pairs:
        try:
            degraded, clean = load_image(degraded_path), load_image(clean_path)
        except Exception as exc:
            skipped.append(f"{degraded_path.name}: unreadable ({type(exc).__name__}: {exc})")
            continue
        if degraded.shape != clean.shape:
            skipped.append(f"{degraded_path.name}: size {tuple(degraded.shape[1:3])} differs from the clean "
                           f"image's {tuple(clean.shape[1:3])}")
            continue
        height, width = degraded.shape[1:3]
        if min(height, width) < resolution:
            skipped.append(f"{degraded_path.name}: {width}x{height} px, smaller than the training resolution "
                           f"{resolution} (use images at least {resolution} px on the short side, or a lower resolution)")
            continue
        good.append((degraded_path.stem, resize_crop(degraded, resolution), resize_crop(clean, resolution)))
    return good, skipped


def check_output(output: Path, resume: bool, node: str, name_input: str = "input 'plugin_name'",
                 resume_fix: str = "turn input 'resume' on") -> None:
    """Never overwrite a user's file: an existing output is continued only when ``resume`` is on and it is a
    PlugKit training save (metadata 'step'); anything else is refused before any work, naming the fix.
    (Saves are atomic, so a continued file stays whole until the next save is.)"""
    if not output.exists():
        return
    if not output.is_file():
        raise ValueError(f"{node}: {name_input}: '{output}' exists and is not a plugin file; choose another name.")
    if not resume:
        raise ValueError(
            f"{node}: {name_input}: '{output}' already exists and resume is off; PlugKit never overwrites a plugin: "
            f"{resume_fix} to continue its training, choose another name, or delete the file first.")
    try:
        meta = plugin_files.read_metadata(output)
    except plugin_files.PluginFileError:
        meta = {}
    if meta.get("format") != plugin_files.PLUGIN_FORMAT or "step" not in meta:
        raise ValueError(
            f"{node}: {name_input}: '{output}' already exists and is not a PlugKit training save (no 'step' in "
            "its metadata), so resuming would overwrite it; choose another name.")


def optimizer_path(plugin_path: Path) -> Path:
    return plugin_path.with_name(plugin_path.name + ".optim.pt")


def _atomic_torch_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def make_optimizer(plugin: TaskPlugin, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        [{"params": list(plugin.scb.parameters())}, {"params": list(plugin.tpb.parameters())}],
        lr=config.learning_rate, betas=(0.9, 0.999), weight_decay=config.weight_decay, eps=1e-8,
    )


def plugin_loss(plugin: TaskPlugin, eps_model: Callable, batch: list[EncodedPair], alphas_cumprod: torch.Tensor,
                generator: torch.Generator, num_train_timesteps: int = 1000) -> torch.Tensor:
    """One batch's epsilon MSE (the official objective)."""
    clean = torch.cat([p.clean_latent for p in batch])
    degraded = torch.cat([p.degraded_latent for p in batch])
    hidden = torch.cat([p.clip_hidden for p in batch])
    b = clean.shape[0]
    noise = torch.randn(clean.shape, generator=generator).to(clean)
    t = torch.randint(0, num_train_timesteps, (b,), generator=generator)
    acp = alphas_cumprod.to(torch.float32)[t].to(clean)[:, None, None, None]
    noisy = acp.sqrt() * clean + (1 - acp).sqrt() * noise
    fp = plugin.tpb(patch_tokens(hidden))
    residuals = plugin.scb(degraded, t.to(clean.device, torch.float32), fp)
    eps = eps_model(noisy, t.to(clean.device, torch.float32), fp, residuals)
    return F.mse_loss(eps.float(), noise.float())


def train_plugin(plugin: TaskPlugin, eps_model: Callable, pairs: list[EncodedPair], alphas_cumprod: torch.Tensor,
                 config: TrainConfig, output: str | os.PathLike, *, resume: bool = True,
                 on_step: Callable[[int, float], None] | None = None,
                 extra_metadata: dict[str, str] | None = None) -> TrainResult:
    """Train ``plugin`` in place for ``config.steps`` steps in all (resuming counts the saved ones)."""
    if not pairs:
        raise ValueError("no usable training pairs")
    output = Path(output)
    optimizer = make_optimizer(plugin, config)
    start = 0
    if resume and output.is_file():
        saved, meta = plugin_files.load_plugin_safetensors(output, name=plugin.name)
        plugin.load_state_dict(saved.state_dict())
        start = int(meta.get("step", "0"))
        opt_file = optimizer_path(output)
        if opt_file.is_file():
            optimizer.load_state_dict(torch.load(str(opt_file), map_location="cpu", weights_only=True))
        else:
            log.warning("Diff-Plugin training: %s has no optimizer state; AdamW restarts from its initial state", output)
        log.info("Diff-Plugin training: resuming %s at step %d", output, start)
    result = TrainResult(plugin=plugin, start_step=start, end_step=start)
    plugin.train().requires_grad_(True)
    params_scb, params_tpb = list(plugin.scb.parameters()), list(plugin.tpb.parameters())

    def save(step: int) -> None:
        meta = {"step": str(step), **(extra_metadata or {})}
        path = plugin_files.save_plugin(plugin, output, meta)
        _atomic_torch_save(optimizer.state_dict(), optimizer_path(output))
        result.saved.append(path)

    try:
        for step in range(start, config.steps):
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            order = torch.randperm(len(pairs), generator=gen).tolist()
            batch = [pairs[order[i % len(pairs)]] for i in range(config.batch_size)]
            loss = plugin_loss(plugin, eps_model, batch, alphas_cumprod, gen, config.num_train_timesteps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params_scb, config.max_grad_norm)
            torch.nn.utils.clip_grad_norm_(params_tpb, config.max_grad_norm)
            optimizer.step()
            value = float(loss.detach())
            result.losses.append(value)
            result.end_step = step + 1
            if config.save_every > 0 and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
                save(step + 1)
            if on_step is not None:
                on_step(step + 1, value)
        if result.end_step > start or not output.is_file():
            save(result.end_step)
    finally:
        plugin.train(False).requires_grad_(False)
    return result
