"""Diff-Plugin's Task-Plugin (Liu et al., CVPR 2024): the task prompt branch (TPB) and the spatial
complement branch (SCB), in plain torch.

Written from the published architecture (yuhaoliu7456/Diff-Plugin, ``modules/TPB.py`` and
``modules/SCB.py``, a diffusers 0.17 ControlNet-like model). Module and parameter names follow the
released checkpoints exactly, so their state dicts load without any key mapping:

- TPB: ``visual_projection.{0,1,3,4,6}`` (Linear, LayerNorm, LeakyReLU, Linear, LayerNorm,
  LeakyReLU, Linear) mapping CLIP ViT-L/14 patch tokens [B, 256, 1024] to Fp [B, 256, 768].
- SCB: ``controlnet_cond_embedding`` (conv 4->320 on the degraded image's latent),
  ``time_embedding.linear_{1,2}``, ``down_blocks.0.{resnets,attentions}.{0,1}`` (diffusers
  ResnetBlock2D / Transformer2DModel names) and ``controlnet_down_blocks.{0,1,2}`` (zero-initialised
  1x1 convs). Its three outputs are residuals for the U-Net's first three skip features.

No ComfyUI import here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CLIP_VISION_DIM = 1024  # CLIP ViT-L/14 hidden size
CONTEXT_DIM = 768  # SD 1.x cross-attention dim (Fp width)
SCB_CHANNELS = 320
SCB_HEADS = 8  # diffusers 0.17 passes attention_head_dim=8 as the number of heads
SCB_LAYERS = 2
LATENT_CHANNELS = 4
GROUPS = 32

# Tasks whose official inference starts from pure noise instead of the noised input latent.
NOISE_START_TASKS = frozenset({"lowlight", "highlight"})


class TaskPromptBranch(nn.Module):
    """TPB: CLIP vision patch tokens [B, N, 1024] -> task prompt Fp [B, N, 768]."""

    def __init__(self, num_layers: int = 2, clip_dim: int = CLIP_VISION_DIM, out_dim: int = CONTEXT_DIM):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(num_layers):
            layers += [nn.Linear(clip_dim, clip_dim), nn.LayerNorm(clip_dim), nn.LeakyReLU()]
        layers.append(nn.Linear(clip_dim, out_dim))
        self.visual_projection = nn.Sequential(*layers)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(patch_tokens)


def patch_tokens(last_hidden_state: torch.Tensor) -> torch.Tensor:
    """CLIP vision last-layer hidden states [B, 1 + N, D] (before the post-layernorm) -> the N patch
    tokens, class token dropped (what the official TPB reads from ``hidden_states[24][:, 1:]``)."""
    if last_hidden_state.ndim != 3:
        raise ValueError(f"expected CLIP vision hidden states [B, tokens, dim], got shape {tuple(last_hidden_state.shape)}")
    return last_hidden_state[:, 1:, :]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding as diffusers' ``Timesteps(dim, flip_sin_to_cos=True, freq_shift=0)``:
    [cos | sin] with frequencies exp(-log(max_period) * i / (dim / 2))."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepMLP(nn.Module):
    """diffusers ``TimestepEmbedding``: linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """diffusers ``ResnetBlock2D`` with equal in/out channels (no shortcut conv), eval-mode (no dropout)."""

    def __init__(self, channels: int, temb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, channels, eps=eps)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, channels)
        self.norm2 = nn.GroupNorm(GROUPS, channels, eps=eps)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class Attention(nn.Module):
    """diffusers ``Attention`` (to_q/to_k/to_v without bias, to_out.0 with bias)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, c = x.shape
        q = self.to_q(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
        k = self.to_k(context).view(b, context.shape[1], self.heads, c // self.heads).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], self.heads, c // self.heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, c))


class GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` (GEGLU, mult 4): keys ``net.0.proj`` and ``net.2``."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """diffusers ``BasicTransformerBlock``: self-attention, cross-attention, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """diffusers ``Transformer2DModel`` with 1x1 conv projections (use_linear_projection=False)."""

    def __init__(self, channels: int, heads: int, context_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(GROUPS, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, heads, context_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x))
        y = y.permute(0, 2, 3, 1).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            y = block(y, context)
        y = y.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return self.proj_out(y) + x


class CrossAttnDownBlock(nn.Module):
    """diffusers ``CrossAttnDownBlock2D`` without downsampler: (resnet, attention) x layers."""

    def __init__(self, channels: int, temb_dim: int, heads: int, context_dim: int, layers: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, temb_dim) for _ in range(layers)])
        self.attentions = nn.ModuleList([SpatialTransformer(channels, heads, context_dim) for _ in range(layers)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for resnet, attn in zip(self.resnets, self.attentions):
            x = attn(resnet(x, temb), context)
            outs.append(x)
        return outs


class SpatialComplementBranch(nn.Module):
    """SCB: (degraded latent, timestep, Fp) -> three residuals for the U-Net's first three skips.

    The noisy sample is not an input: the official SCB replaces it by the embedded degraded latent.
    """

    def __init__(self, channels: int = SCB_CHANNELS, heads: int = SCB_HEADS, context_dim: int = CONTEXT_DIM,
                 layers: int = SCB_LAYERS, in_channels: int = LATENT_CHANNELS):
        super().__init__()
        self.channels = channels
        self.controlnet_cond_embedding = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.time_embedding = TimestepMLP(channels, channels * 4)
        self.down_blocks = nn.ModuleList([CrossAttnDownBlock(channels, channels * 4, heads, context_dim, layers)])
        self.controlnet_down_blocks = nn.ModuleList([nn.Conv2d(channels, channels, 1) for _ in range(layers + 1)])
        self.zero_output_convs()

    @torch.no_grad()
    def zero_output_convs(self) -> None:
        for conv in self.controlnet_down_blocks:
            conv.weight.zero_()
            conv.bias.zero_()

    def forward(self, cond_latent: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
        batch = context.shape[0]
        if cond_latent.shape[0] != batch:
            if batch % cond_latent.shape[0] != 0:
                raise ValueError(f"SCB: latent batch {cond_latent.shape[0]} does not divide context batch {batch}")
            cond_latent = cond_latent.repeat(batch // cond_latent.shape[0], 1, 1, 1)
        timesteps = torch.as_tensor(timesteps, device=cond_latent.device).reshape(-1)
        if timesteps.shape[0] != batch:
            timesteps = timesteps[:1].expand(batch) if timesteps.shape[0] == 1 else timesteps
        dtype = self.controlnet_cond_embedding.weight.dtype
        temb = self.time_embedding(timestep_embedding(timesteps, self.channels).to(dtype))
        h = self.controlnet_cond_embedding(cond_latent.to(dtype))
        context = context.to(dtype)
        features = [h]
        for block in self.down_blocks:
            features += block(h, temb, context)
            h = features[-1]
        return [conv(f) for conv, f in zip(self.controlnet_down_blocks, features)]


class TaskPlugin(nn.Module):
    """One Task-Plugin: TPB + SCB, plus the task's name and how its sampling starts."""

    def __init__(self, name: str = "plugin", start_from_noise: bool | None = None, scb_channels: int = SCB_CHANNELS):
        super().__init__()
        self.name = name
        if start_from_noise is None:
            start_from_noise = name.lower() in NOISE_START_TASKS
        self.start_from_noise = bool(start_from_noise)
        self.tpb = TaskPromptBranch()
        self.scb = SpatialComplementBranch(channels=scb_channels)

    def task_prompt(self, clip_last_hidden_state: torch.Tensor) -> torch.Tensor:
        """CLIP vision last hidden states (class token included) -> Fp."""
        tokens = patch_tokens(clip_last_hidden_state)
        dtype = self.tpb.visual_projection[0].weight.dtype
        return self.tpb(tokens.to(device=self.tpb.visual_projection[0].weight.device, dtype=dtype))

    def __repr__(self) -> str:  # short: plugins show up in logs and errors
        return f"TaskPlugin(name={self.name!r}, start_from_noise={self.start_from_noise})"


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
