"""Training a Task-Plugin (TPB + SCB) on (degraded, clean) pairs, as the official ``train.py``:
frozen U-Net / VAE / CLIP vision; epsilon MSE at uniform timesteps t in [0, 1000); AdamW (lr 1e-5 x
global batch with the official scaling, weight decay 1e-2, constant schedule); gradient norm clipped
to 1.0 for the SCB and the TPB each; optional gradient accumulation, the official ``--use_data_aug``
crop and flip, fp16/bf16 autocast (fp16 with loss scaling) over fp32 plugin weights, and several
processes (DistributedDataParallel under an initialised torch.distributed group).

No ComfyUI import: the frozen models come in as callables (see ``runs.py`` for the glue):
- ``eps_model(x_t, t, context, residuals) -> eps`` (the U-Net with the residuals on its first three skips),
- ``encode(name, degraded, clean) -> EncodedPair`` (clean and degraded latents, already scaled, and the
  degraded image's CLIP vision last hidden states), called by ``PairStream`` per sample as batches need
  it: nothing is held for the whole dataset.

Deviation from the official script, documented: the latents are the VAE posterior mean (the official
script samples the clean image's posterior each step).

Checkpoints: the plugin ``.safetensors`` (metadata ``step``) plus ``<file>.optim.pt`` holding the
AdamW and loss-scaler state, both written atomically (rank 0); ``resume`` continues from them. Each
sample's randomness (augmentation, noise, timestep) comes from a generator seeded with (seed, step,
its index in the global batch), and the pair order from one seeded with (seed, step), so a resumed run
repeats what an uninterrupted one does and any split of a global batch over micro-steps and processes
draws the same samples (to float level: kernels may reduce in another order from run to run).
"""
from __future__ import annotations

import contextlib
import logging
import math
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


LR_SCALINGS = ("official", "none")
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class TrainConfig:
    """``batch_size`` is per process and per micro-step; one optimisation step sees
    ``batch_size x grad_accum x processes`` pairs (the global batch). The official defaults: lr 1e-5
    scaled by that global batch (``lr_scaling="official"``: ``train.py``'s ``--scale_lr``, always on there),
    no accumulation, no augmentation (``--use_data_aug`` off), fp32."""
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    learning_rate: float = 1e-5
    lr_scaling: str = "official"
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    save_every: int = 250
    seed: int = 0
    num_train_timesteps: int = 1000
    augment: bool = False
    precision: str = "fp32"

    def effective_lr(self, processes: int = 1) -> float:
        """``train.py``: ``lr * gradient_accumulation_steps * train_batch_size * num_processes``."""
        if self.lr_scaling == "official":
            return self.learning_rate * self.batch_size * self.grad_accum * processes
        if self.lr_scaling == "none":
            return self.learning_rate
        raise ValueError(f"lr_scaling must be one of {LR_SCALINGS}, got {self.lr_scaling!r}")


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
    learning_rate: float = 0.0
    validations: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (step, [1, H, W, 3])


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


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def check_pairs(pairs: list[tuple[Path, Path]], resolution: int) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Keep the usable pairs by reading only the image headers (nothing is decoded or held). Skipped and
    reported by file name: an unreadable pair, one whose two images differ in size, and one smaller than
    ``resolution`` on its short side (it would only be upscaled)."""
    good, skipped = [], []
    for degraded_path, clean_path in pairs:
        try:
            d_size, c_size = image_size(degraded_path), image_size(clean_path)
        except Exception as exc:
            skipped.append(f"{degraded_path.name}: unreadable ({type(exc).__name__}: {exc})")
            continue
        if d_size != c_size:
            skipped.append(f"{degraded_path.name}: size {(d_size[1], d_size[0])} differs from the clean "
                           f"image's {(c_size[1], c_size[0])}")
            continue
        width, height = d_size
        if min(height, width) < resolution:
            skipped.append(f"{degraded_path.name}: {width}x{height} px, smaller than the training resolution "
                           f"{resolution} (use images at least {resolution} px on the short side, or a lower resolution)")
            continue
        good.append((degraded_path, clean_path))
    return good, skipped


def augment_crop(degraded: torch.Tensor, clean: torch.Tensor, resolution: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``--use_data_aug`` (``dataset.py``'s ``data_augmentation``), the same for both images:
    with probability 1/2 a random crop (``resolution`` square when both sides exceed it, else a random
    square of the short side along the long side; neither when one side equals it), with probability 1/2 a
    horizontal flip, then a resize to ``resolution`` x ``resolution`` (bilinear, aspect not kept, as
    ``F.resize(img, (512, 512))``). Randomness from ``generator``, not Python's ``random``."""
    h, w = degraded.shape[1:3]

    def coin() -> bool:
        return bool(torch.rand((), generator=generator) > 0.5)

    def randint(low: int, high: int) -> int:  # inclusive, as random.randint
        return int(torch.randint(low, high + 1, (), generator=generator))

    top = left = 0
    ch, cw = h, w
    if coin():
        if w > resolution and h > resolution:
            top, left, ch, cw = randint(0, h - resolution), randint(0, w - resolution), resolution, resolution
        elif w < resolution or h < resolution:
            short, start = min(h, w), randint(0, max(h, w) - min(h, w))
            ch = cw = short
            top, left = (0, start) if w > h else (start, 0)
    flip = coin()

    def apply(x: torch.Tensor) -> torch.Tensor:
        x = x[:, top:top + ch, left:left + cw]
        if flip:
            x = x.flip(2)
        x = F.interpolate(x.movedim(-1, 1), size=(resolution, resolution), mode="bilinear", align_corners=False,
                          antialias=True)
        return x.movedim(1, -1).clamp(0, 1)

    return apply(degraded), apply(clean)


Encoder = Callable[[str, torch.Tensor, torch.Tensor], EncodedPair]


class PairStream:
    """The training pairs as files: each is read, cropped (centre, or the official augmentation) and
    encoded when a batch needs it, then dropped; nothing grows with the number of pairs but the list of
    paths. ``encode(name, degraded [1, r, r, 3], clean [1, r, r, 3]) -> EncodedPair`` runs the frozen
    encoders. A pair that fails to decode mid-run (its header was fine) is logged and replaced by the next
    pair in the list, so a run never stops on one bad file."""

    def __init__(self, pairs: list[tuple[Path, Path]], resolution: int, encode: Encoder, augment: bool = False):
        if not pairs:
            raise ValueError("no usable training pairs")
        self.pairs, self.resolution, self.encode, self.augment = list(pairs), resolution, encode, augment
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.pairs)

    def get(self, index: int, generator: torch.Generator) -> EncodedPair:
        for k in range(len(self.pairs)):
            i = (index + k) % len(self.pairs)
            if i in self.bad:
                continue
            degraded_path, clean_path = self.pairs[i]
            try:
                degraded, clean = load_image(degraded_path), load_image(clean_path)
            except Exception as exc:
                log.warning("Diff-Plugin training: skipped %s: unreadable (%s: %s)", degraded_path.name,
                            type(exc).__name__, exc)
                self.bad.add(i)
                continue
            if self.augment:
                degraded, clean = augment_crop(degraded, clean, self.resolution, generator)
            else:
                degraded, clean = resize_crop(degraded, self.resolution), resize_crop(clean, self.resolution)
            return self.encode(degraded_path.stem, degraded, clean)
        raise ValueError("no training pair could be read")


class EncodedList:
    """Pre-encoded pairs held in memory (small sets, tests): the same interface as ``PairStream``."""

    def __init__(self, pairs: list[EncodedPair]):
        if not pairs:
            raise ValueError("no usable training pairs")
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def get(self, index: int, generator: torch.Generator) -> EncodedPair:
        return self.pairs[index]


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


def make_optimizer(plugin: TaskPlugin, config: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    lr = config.learning_rate if lr is None else lr
    return torch.optim.AdamW(
        [{"params": list(plugin.scb.parameters())}, {"params": list(plugin.tpb.parameters())}],
        lr=lr, betas=(0.9, 0.999), weight_decay=config.weight_decay, eps=1e-8,
    )


class PluginForward(torch.nn.Module):
    """TPB then SCB as one module (what DistributedDataParallel wraps): (CLIP hidden states, degraded
    latent, t) -> (Fp, the SCB residuals)."""

    def __init__(self, plugin: TaskPlugin):
        super().__init__()
        self.plugin = plugin

    def forward(self, hidden: torch.Tensor, degraded: torch.Tensor, t: torch.Tensor):
        fp = self.plugin.tpb(patch_tokens(hidden))
        return fp, self.plugin.scb(degraded, t, fp)


def plugin_loss(plugin: TaskPlugin, eps_model: Callable, batch: list[EncodedPair], alphas_cumprod: torch.Tensor,
                generator: torch.Generator | None = None, num_train_timesteps: int = 1000, *,
                noise: torch.Tensor | None = None, t: torch.Tensor | None = None,
                forward: Callable | None = None) -> torch.Tensor:
    """One batch's epsilon MSE, the official objective: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (diffusers'
    ``DDPMScheduler.add_noise``), t uniform in [0, num_train_timesteps), mean squared error of the U-Net's
    eps against eps in float32. ``noise``/``t`` given, or drawn from ``generator`` for the whole batch."""
    clean = torch.cat([p.clean_latent for p in batch])
    degraded = torch.cat([p.degraded_latent for p in batch])
    hidden = torch.cat([p.clip_hidden for p in batch])
    b = clean.shape[0]
    if noise is None:
        noise = torch.randn(clean.shape, generator=generator)
    if t is None:
        t = torch.randint(0, num_train_timesteps, (b,), generator=generator)
    noise = noise.to(clean)
    acp = alphas_cumprod.to(torch.float32)[t.cpu()].to(clean)[:, None, None, None]
    noisy = acp.sqrt() * clean + (1 - acp).sqrt() * noise
    t_float = t.to(clean.device, torch.float32)
    fp, residuals = (forward or PluginForward(plugin))(hidden, degraded, t_float)
    eps = eps_model(noisy, t_float, fp, residuals)
    return F.mse_loss(eps.float(), noise.float())


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The generator of one sample of one step (its augmentation, noise and timestep): it depends on the
    sample's place in the global batch, not on the process or micro-step that computes it, so any split
    of the same global batch over batch size, accumulation and processes draws the same samples."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 65_537 + index) % (1 << 63))


def distributed_world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _autocast(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def train_plugin(plugin: TaskPlugin, eps_model: Callable, pairs, alphas_cumprod: torch.Tensor,
                 config: TrainConfig, output: str | os.PathLike, *, resume: bool = True,
                 on_step: Callable[[int, float], None] | None = None,
                 extra_metadata: dict[str, str] | None = None,
                 validate: Callable[[int], torch.Tensor | None] | None = None, validate_every: int = 0) -> TrainResult:
    """Train ``plugin`` in place for ``config.steps`` optimisation steps in all (resuming counts the saved
    ones). ``pairs``: a ``PairStream`` (files, read per batch), an ``EncodedList`` or a list of
    ``EncodedPair``. Under an initialised torch.distributed group each process computes its share of
    the global batch through DistributedDataParallel; rank 0 saves; every rank resumes from the file.

    Precision: the plugin keeps float32 weights (AdamW's master copy); with ``precision`` fp16 or bf16 the
    forward runs under autocast in that dtype (frozen U-Net included) and fp16 gets loss scaling
    (``torch.amp.GradScaler``), so small gradients do not flush to zero in half precision."""
    source = pairs if hasattr(pairs, "get") else EncodedList(pairs)
    output = Path(output)
    rank, world = distributed_world()
    device = next(plugin.parameters()).device
    lr = config.effective_lr(world)
    optimizer = make_optimizer(plugin, config, lr)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    start = 0
    if resume and output.is_file():
        saved, meta = plugin_files.load_plugin_safetensors(output, name=plugin.name)
        plugin.load_state_dict(saved.state_dict())
        start = int(meta.get("step", "0"))
        opt_file = optimizer_path(output)
        if opt_file.is_file():
            state = torch.load(str(opt_file), map_location="cpu", weights_only=True)
            if "optimizer" in state:
                optimizer.load_state_dict(state["optimizer"])
                if state.get("scaler") and scaler.is_enabled():
                    scaler.load_state_dict(state["scaler"])
            else:  # before 0.x: the AdamW state alone
                optimizer.load_state_dict(state)
            for group in optimizer.param_groups:
                group["lr"] = lr
        else:
            log.warning("Diff-Plugin training: %s has no optimizer state; AdamW restarts from its initial state", output)
        log.info("Diff-Plugin training: resuming %s at step %d", output, start)
    result = TrainResult(plugin=plugin, start_step=start, end_step=start, learning_rate=lr)
    plugin.train().requires_grad_(True)
    params_scb, params_tpb = list(plugin.scb.parameters()), list(plugin.tpb.parameters())
    forward = PluginForward(plugin)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
    n = len(source)

    def save(step: int) -> None:
        if rank == 0:
            meta = {"step": str(step), "learning_rate": repr(lr),
                    "global_batch": str(config.batch_size * config.grad_accum * world), **(extra_metadata or {})}
            path = plugin_files.save_plugin(plugin, output, meta)
            _atomic_torch_save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()},
                               optimizer_path(output))
            result.saved.append(path)
        if world > 1:
            torch.distributed.barrier()

    try:
        for step in range(start, config.steps):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + step)).tolist()
            optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), dtype=torch.float64)
            for micro in range(config.grad_accum):
                batch, noises, ts = [], [], []
                for b in range(config.batch_size):
                    j = (micro * world + rank) * config.batch_size + b
                    gen = sample_generator(config.seed, step, j)
                    pair = source.get(order[j % n], gen)
                    batch.append(pair)
                    noises.append(torch.randn(pair.clean_latent.shape, generator=gen))
                    ts.append(torch.randint(0, config.num_train_timesteps, (1,), generator=gen))
                last = micro == config.grad_accum - 1
                sync = forward.no_sync() if world > 1 and not last else contextlib.nullcontext()
                with sync:
                    with _autocast(device, config.precision):
                        loss = plugin_loss(plugin, eps_model, batch, alphas_cumprod, noise=torch.cat(noises),
                                           t=torch.cat(ts), forward=forward)
                    scaler.scale(loss / config.grad_accum).backward()
                total += float(loss.detach()) / config.grad_accum
                del batch, noises, loss
            if world > 1:
                total = total.to(device)
                torch.distributed.all_reduce(total)
                total = total.cpu() / world
            value = float(total)
            if not math.isfinite(value):
                raise ValueError(f"Diff-Plugin training: the loss is {value} at step {step + 1} (precision "
                                 f"{config.precision}, lr {lr:g}); lower the learning rate or use fp32/bf16")
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params_scb, config.max_grad_norm)
            torch.nn.utils.clip_grad_norm_(params_tpb, config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            result.losses.append(value)
            result.end_step = step + 1
            if config.save_every > 0 and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
                save(step + 1)
            if validate is not None and validate_every > 0 and (step + 1) % validate_every == 0 and rank == 0:
                plugin.train(False)
                with torch.no_grad():
                    image = validate(step + 1)
                plugin.train()
                if image is not None:
                    result.validations.append((step + 1, image))
            if on_step is not None:
                on_step(step + 1, value)
        if result.end_step > start or not output.is_file():
            save(result.end_step)
    finally:
        plugin.train(False).requires_grad_(False)
    return result


def validation_sample(plugin: TaskPlugin, eps_model: Callable, pair: EncodedPair, alphas_cumprod: torch.Tensor,
                      steps: int = 20, seed: int = 0) -> torch.Tensor:
    """The official inference (``infer.py``: UniPC bh2 on the official timesteps, the input noised at
    t = 999, re-noised while t >= 960) with the plugin as it is now, on one pair: the clean-latent
    estimate [1, 4, h, w] (scaled, as the pair's latents). Pure torch, for the validation images."""
    from . import official_unipc as ou

    acp = alphas_cumprod.to(torch.float32)
    sigma_of_t = lambda t: ((1 - acp[t.long()]) / acp[t.long()]).sqrt()  # noqa: E731
    timesteps = ou.official_timesteps(steps)
    sigmas = ou.official_sigmas(sigma_of_t, steps).to(pair.degraded_latent)
    t_of_sigma = {round(float(s), 6): t for s, t in zip(sigmas.tolist(), timesteps + [0])}
    fp = plugin.tpb(patch_tokens(pair.clip_hidden))
    degraded = pair.degraded_latent

    def model(x, sigma):
        s = float(sigma[0])
        t = torch.full((x.shape[0],), float(t_of_sigma[round(s, 6)]), device=x.device)
        x_vp = x / math.sqrt(1.0 + s * s)
        eps = eps_model(x_vp, t, fp, plugin.scb(degraded, t, fp)).to(x)
        return x - eps * s

    noise = torch.randn(degraded.shape, generator=torch.Generator().manual_seed(seed)).to(degraded)
    x = ou.official_start(degraded, noise, float(sigmas[0]), plugin.start_from_noise)
    x = ou.sample_official_unipc(model, x, sigmas, renoise=ou.renoise_flags(timesteps),
                                 renoise_latent=degraded, renoise_noise=noise)
    return ou.official_finish(x, float(sigmas[-1]))


def loss_curve_image(losses: list[float], width: int = 512, height: int = 256, start_step: int = 0) -> torch.Tensor:
    """The losses (and their running mean over ~5% of the run) drawn as an image [1, H, W, 3] in [0, 1]."""
    import numpy as np
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    pad = 28
    if losses:
        values = torch.tensor(losses, dtype=torch.float64)
        k = max(1, len(losses) // 20)
        smooth = torch.nn.functional.avg_pool1d(values[None, None], k, 1, padding=0, count_include_pad=False)[0, 0] \
            if len(losses) >= k else values
        low, high = float(values.min()), float(values.max())
        span = (high - low) or 1.0

        def xy(i, v, n):
            x = pad + (width - 2 * pad) * (i / max(n - 1, 1))
            return x, height - pad - (height - 2 * pad) * ((v - low) / span)

        draw.line([xy(i, v, len(values)) for i, v in enumerate(values.tolist())], fill=(170, 190, 230), width=1)
        offset = (len(values) - len(smooth)) / 2
        n = len(values)
        draw.line([xy(i + offset, v, n) for i, v in enumerate(smooth.tolist())], fill=(20, 60, 160), width=2)
        draw.text((pad, 6), f"loss  max {high:.4f}  min {low:.4f}  last (mean of {k}) {float(smooth[-1]):.4f}",
                  fill=(0, 0, 0))
        draw.text((pad, height - pad + 8), f"step {start_step + 1}", fill=(0, 0, 0))
        draw.text((width - pad - 70, height - pad + 8), f"step {start_step + n}", fill=(0, 0, 0))
    draw.rectangle([pad, pad, width - pad, height - pad], outline=(120, 120, 120))
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None]
