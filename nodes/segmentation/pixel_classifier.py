"""Pixel classifiers on diffusion features (Baranchuk et al., "Label-Efficient Semantic Segmentation
with Diffusion Models", ICLR 2022; official code yandex-research/ddpm-segmentation, MIT).

Pure torch (no ComfyUI import). Written by us from the paper and the official
``src/pixel_classifier.py`` / ``train_interpreter.py``:

- the MLP: Linear(D, 128) -> ReLU -> BatchNorm1d -> Linear(128, 32) -> ReLU -> BatchNorm1d ->
  Linear(32, C) (below 30 classes; 256/128 wide from 30), weights N(0, 0.02), biases 0;
- training: cross-entropy, Adam (lr 1e-3), shuffled batches of 64 pixels, at most 100 epochs, and
  the official early stop (from the 5th epoch on, stop after 50 batches in a row whose loss is not a
  new minimum);
- prediction: each member's arg-max, majority vote over the ensemble (``torch.mode``: ties go to
  the lower class, as the official code); uncertainty = entropy of the mean softmax minus the mean
  of the members' entropies (the official Jensen-Shannon score), here divided by ln C (0..1).

Features are held at the latent resolution (see ``features.py``). The official code upsamples them
bilinearly to the image size and classifies every image pixel; since bilinear interpolation is
linear with weights summing to 1, ``Linear(upsample(F)) == upsample(Linear(F))``, so we apply the
first layer at the latent resolution and upsample its 128 channels, which is the same result at a
fraction of the memory (tested in tests/segmentation/test_segmentation_math.py).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -1
LEARNING_RATE = 1e-3  # official
OFFICIAL_BATCH = 64
OFFICIAL_MAX_EPOCHS = 100
OFFICIAL_PATIENCE = 50  # batches without a new minimum loss
OFFICIAL_MIN_EPOCHS = 4  # the early stop is checked from epoch index 4 (``if epoch > 3``)


class PixelClassifier(nn.Module):
    """The official per-pixel MLP (``pixel_classifier``)."""

    def __init__(self, n_classes: int, dim: int):
        super().__init__()
        a, b = (128, 32) if n_classes < 30 else (256, 128)
        self.layers = nn.Sequential(
            nn.Linear(dim, a), nn.ReLU(), nn.BatchNorm1d(a),
            nn.Linear(a, b), nn.ReLU(), nn.BatchNorm1d(b),
            nn.Linear(b, n_classes),
        )

    def init_weights(self, generator: torch.Generator, gain: float = 0.02) -> None:
        """Official ``init_weights('normal', 0.02)``: Linear weights N(0, gain), biases 0 (BatchNorm1d
        keeps torch's defaults, as in the official code, whose rule only touches BatchNorm2d)."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * gain)
                    m.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every layer after the first Linear, on its (N, width) output."""
        return self.layers[1:](hidden)


# ---- bilinear upsampling as an explicit gather (align_corners=False, like F.interpolate) --------

def bilinear_taps(n_out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each output index: (i0, i1, w1) with value = (1 - w1) * v[i0] + w1 * v[i1]."""
    scale = n_in / n_out
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    w1 = (src - i0.double()).float()
    return i0, i1, w1


def gather_bilinear(features: torch.Tensor, imgs: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor,
                    out_hw: tuple[int, int]) -> torch.Tensor:
    """Rows of ``F.interpolate(features, out_hw, mode='bilinear')`` at output pixels (imgs, ys, xs).

    ``features``: (B, D, h, w). Returns (N, D) without building the full upsampled map.
    """
    _, _, h, w = features.shape
    y0, y1, wy = (t[ys] for t in bilinear_taps(out_hw[0], h))
    x0, x1, wx = (t[xs] for t in bilinear_taps(out_hw[1], w))
    cl = features.permute(0, 2, 3, 1)  # (B, h, w, D) view
    wy, wx = wy[:, None], wx[:, None]
    top = cl[imgs, y0, x0] * (1 - wx) + cl[imgs, y0, x1] * wx
    bottom = cl[imgs, y1, x0] * (1 - wx) + cl[imgs, y1, x1] * wx
    return top * (1 - wy) + bottom * wy


# ---- labels -------------------------------------------------------------------------------------

def labels_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """(B, H, W) masks in 0..1 -> (B, H, W) long labels: 1 where the mask is above 0.5, else 0."""
    return (masks > 0.5).long()


def labels_from_colours(images: torch.Tensor, max_classes: int = 64) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """(B, H, W, 3) label images -> ((B, H, W) long labels, palette).

    Every distinct 8-bit colour is a class; classes are numbered in (R, G, B) order, so black (if
    used) is class 0. Raises ValueError when there are more than ``max_classes`` colours (a painted
    label image with anti-aliased edges) or fewer than two.
    """
    q = (images[..., :3].clamp(0, 1) * 255).round().long()
    code = (q[..., 0] << 16) | (q[..., 1] << 8) | q[..., 2]
    colours, inverse = torch.unique(code, return_inverse=True)
    if colours.numel() > max_classes:
        raise ValueError(f"found {colours.numel()} distinct colours (at most {max_classes}); paint the label image "
                         "with flat colours, without anti-aliasing or blur, and save it as PNG")
    if colours.numel() < 2:
        raise ValueError("has a single colour; paint at least two classes")
    palette = [(int(c >> 16) & 255, int(c >> 8) & 255, int(c) & 255) for c in colours.tolist()]
    return inverse.reshape(code.shape).long(), palette


def downsample_labels(labels: torch.Tensor, hw: tuple[int, int], n_classes: int) -> torch.Tensor:
    """(B, H, W) labels -> (B, h, w): the majority label of each cell (area-averaged one-hot, ties
    to the lower class); cells whose pixels are all ignored stay ignored."""
    valid = labels >= 0
    onehot = F.one_hot(labels.clamp(min=0), n_classes).permute(0, 3, 1, 2).float() * valid[:, None].float()
    area = F.adaptive_avg_pool2d(onehot, hw)
    out = area.argmax(dim=1)
    out[area.sum(dim=1) <= 0] = IGNORE
    return out


# ---- training -----------------------------------------------------------------------------------

@dataclass
class PixelSet:
    """Training pixels: features (B, D, h, w) at the latent resolution and labels (B, H', W').

    ``resolution='latent'``: labels are at (h, w), one sample per latent cell (its own feature).
    ``resolution='image'``: labels are at the image size, one sample per image pixel with the
    bilinearly upsampled feature (the official recipe), gathered per batch.
    Ignored pixels (label -1) are left out.
    """

    features: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor = field(init=False)  # (N, 3): image, y, x

    def __post_init__(self):
        self.index = torch.nonzero(self.labels >= 0)

    @property
    def resolution(self) -> str:
        return "latent" if tuple(self.labels.shape[1:]) == tuple(self.features.shape[2:]) else "image"

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i, y, x = self.index[rows.to(self.index.device)].unbind(1)
        if self.resolution == "latent":
            feats = self.features.permute(0, 2, 3, 1)[i, y, x]
        else:
            feats = gather_bilinear(self.features, i, y, x, tuple(self.labels.shape[1:]))
        return feats, self.labels[i, y, x]


def train_classifier(data: PixelSet, n_classes: int, dim: int, seed: int, *, batch_size: int = OFFICIAL_BATCH,
                     max_epochs: int = OFFICIAL_MAX_EPOCHS, patience: int = OFFICIAL_PATIENCE,
                     min_epochs: int = OFFICIAL_MIN_EPOCHS, device: torch.device | str = "cpu",
                     check: Optional[Callable[[], None]] = None) -> tuple[PixelClassifier, dict]:
    """Train one ensemble member with the official loop; returns (classifier in eval mode, stats)."""
    # ComfyUI runs nodes under torch.inference_mode(): gradients need it off (as core's trainer does).
    with torch.inference_mode(False), torch.enable_grad():
        return _train_classifier(data, n_classes, dim, seed, batch_size=batch_size, max_epochs=max_epochs,
                                 patience=patience, min_epochs=min_epochs, device=device, check=check)


def _train_classifier(data, n_classes, dim, seed, *, batch_size, max_epochs, patience, min_epochs, device, check):
    gen = torch.Generator().manual_seed(int(seed))
    model = PixelClassifier(n_classes, dim)
    model.init_weights(gen)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    best, strikes, it, stop = float("inf"), 0, 0, False
    epoch = 0
    for epoch in range(max_epochs):
        perm = torch.randperm(len(data), generator=gen)
        for rows in perm.split(batch_size):
            if rows.numel() < 2:  # BatchNorm1d cannot train on one sample
                continue
            x, y = data.batch(rows)
            x, y = x.to(device), y.to(device)
            if x.is_inference():  # features computed under inference mode cannot be saved for backward
                x = x.clone()
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError("the training loss is not finite (NaN or inf in the features?)")
            loss.backward()
            opt.step()
            it += 1
            if check is not None and it % 50 == 0:
                check()
            if epoch >= min_epochs:
                value = float(loss.detach())
                if value < best:
                    best, strikes = value, 0
                else:
                    strikes += 1
                if strikes > patience:
                    stop = True
                    break
        if stop:
            break
    return model.eval(), {"iterations": it, "epochs": epoch + 1, "early_stop": stop}


# ---- prediction ---------------------------------------------------------------------------------

@torch.no_grad()
def member_logits(model: PixelClassifier, features: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """(D, h, w) features -> (H*W, C) logits of the member at ``out_hw``: exactly the member applied
    to the bilinearly upsampled features (first layer applied before upsampling: see module doc)."""
    first = model.layers[0]
    d, h, w = features.shape
    hidden = (first.weight @ features.reshape(d, h * w).to(first.weight) + first.bias[:, None]).reshape(1, -1, h, w)
    if (h, w) != tuple(out_hw):
        hidden = F.interpolate(hidden, size=tuple(out_hw), mode="bilinear", align_corners=False)
    return model.head(hidden[0].reshape(hidden.shape[1], -1).T)


@torch.no_grad()
def predict(models: list, features: torch.Tensor, out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Majority vote and uncertainty of an ensemble on one image.

    Returns ((H, W) long labels, (H, W) float uncertainty in 0..1: the official Jensen-Shannon score
    H(mean p) - mean H(p_k), divided by ln C).
    """
    votes, mean_p, mean_h = [], None, None
    for m in models:
        logits = member_logits(m, features, out_hw).float()
        logp = torch.log_softmax(logits, dim=1)
        p = logp.exp()
        ent = -(p * logp).sum(dim=1)
        votes.append(logits.argmax(dim=1))
        mean_p = p if mean_p is None else mean_p + p
        mean_h = ent if mean_h is None else mean_h + ent
    k = len(models)
    mean_p, mean_h = mean_p / k, mean_h / k
    full = -(mean_p * torch.log(mean_p.clamp_min(1e-30))).sum(dim=1)
    n_classes = mean_p.shape[1]
    js = ((full - mean_h) / math.log(n_classes)).clamp(0, 1)
    labels = torch.mode(torch.stack(votes, dim=1), dim=1).values
    return labels.reshape(out_hw), js.reshape(out_hw)


def colourise(labels: torch.Tensor, palette: list) -> torch.Tensor:
    """(H, W) labels -> (H, W, 3) image in 0..1 with the palette's colours."""
    pal = torch.tensor(palette, dtype=torch.float32) / 255.0
    return pal[labels.clamp(0, len(palette) - 1)]


def iou(pred: torch.Tensor, target: torch.Tensor, cls: int) -> float:
    """Intersection over union of class ``cls`` (1.0 when it is in neither)."""
    p, t = pred == cls, target == cls
    union = int((p | t).sum())
    return 1.0 if union == 0 else int((p & t).sum()) / union


def pixel_accuracy(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> list[Optional[float]]:
    """Per-class share of the class's (non-ignored) pixels predicted as that class (None if absent)."""
    out = []
    for c in range(n_classes):
        sel = target == c
        n = int(sel.sum())
        out.append(None if n == 0 else int((pred[sel] == c).sum()) / n)
    return out


def ensemble(data: PixelSet, n_classes: int, dim: int, members: int, seed: int, **kw) -> tuple[list, dict]:
    """Train ``members`` classifiers (seeds seed, seed+1, ...); returns (models, stats)."""
    t0 = time.perf_counter()
    models, iters = [], []
    for k in range(members):
        m, stats = train_classifier(data, n_classes, dim, seed + k, **kw)
        models.append(m.cpu())
        iters.append(stats["iterations"])
    return models, {"seconds": time.perf_counter() - t0, "iterations": iters, "pixels": len(data)}
