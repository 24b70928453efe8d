"""Plug-and-Play injection hooks on a ComfyUI U-Net (host side: imports ComfyUI).

How one sampling run works (see docs/pnp.md):

- ``PnPSampleWrapper`` (OUTER_SAMPLE) validates the run against the source (latent size, batch,
  model family, no added noise, sigmas on the inversion's schedule) and puts a fresh ``PnPRun`` into
  the run's own ``transformer_options``; the run's model options are restored in ``finally``, so
  nothing survives the run.
- ``PnPPredictNoiseWrapper`` (PREDICT_NOISE, once per model evaluation) records which step of the
  source trajectory the evaluation belongs to (absolute step: a split run counts as one run; a
  second evaluation inside a step belongs to the step it started).
- ``PnPApplyModelWrapper`` (APPLY_MODEL) decides per model call whether the current step is inside
  an injection window. Outside both windows it calls the model with exactly the batch it was given.
  Inside, it appends one source chunk (the source latent at the current sigma, with the source's
  own conditioning captured at inversion) to the batch, publishes an ``InjectionCall`` through a
  context variable for the duration of the call, and drops the source rows from the output.
- ``FeatureInjectionResBlock`` (object patch on ``output_blocks.<i>.0``) overwrites the residual
  branch (after ``out_layers``, before the skip is added) of every target row with its source row.
- ``AttentionInjection`` (attn1 replace on the chosen decoder blocks) overwrites q and k (not v)
  of every target row with its source row, then runs ComfyUI's optimized attention (or the replace
  that was registered before it).
"""
from __future__ import annotations

import contextvars
import logging
import math
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_patcher
import comfy.patcher_extension
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel

from .ddim_inversion import (
    SourceTrajectory,
    describe_sigmas,
    extra_evaluations,
    injection_steps,
    schedule_offset,
    step_index,
)

log = logging.getLogger(__name__)

WRAPPER_KEY = "plugkit_pnp"
RUN_KEY = "plugkit_pnp_run"
SOURCE_UUID = uuid.UUID("9b1c8d2e-5f1a-4c57-9a43-7f1d2a9c0e11")  # the source chunk's uuid in a batch

# Family defaults (decoder = ComfyUI ``output_blocks``). SD1.x/2.x have 12 decoder blocks: the
# official features come from block 4 (diffusers up_blocks[1].resnets[1]) and q/k from blocks 4-11.
# SDXL has 9: the same position (second block of the first 1/4-resolution decoder level) is block
# 1, and the decoder attention except its first block is blocks 1-5.
FAMILY_DEFAULTS = {
    12: {"name": "SD1.x/SD2.x", "features": (4,), "attention": tuple(range(4, 12))},
    9: {"name": "SDXL", "features": (1,), "attention": tuple(range(1, 6))},
}

_CALL: contextvars.ContextVar[Optional["InjectionCall"]] = contextvars.ContextVar("plugkit_pnp_call", default=None)


@dataclass
class InjectionCall:
    """What the hooks need during one U-Net call: which rows are targets and where their source is.

    ``index`` has one entry per batch row: for a target row the source row to copy from, for a
    source row itself. ``observe`` (optional) receives ``(kind, key, tensor...)`` (feature maps).
    """

    n_total: int
    index: Optional[torch.Tensor]
    features: bool = False
    attention: bool = False
    observe: Optional[Callable[..., None]] = None
    features_taken: int = 0  # feature injections that ran (0 in a window: another patch bypassed them)
    n_target: int = 0  # rows before the source rows (the sampler's own batch)
    record: Optional[dict] = None  # in-batch call filling the source cache: layer -> source rows' tensor
    cached: Optional[dict] = None  # cache hit (no source rows in the batch): layer -> source rows' tensor
    cached_index: Optional[torch.Tensor] = None  # cache hit: the cached row of every batch row

    def take(self, t: torch.Tensor) -> torch.Tensor:
        idx = self.index if self.index.device == t.device else self.index.to(t.device)
        return t.index_select(0, idx)

    def from_cache(self, key, like: torch.Tensor) -> torch.Tensor:
        """The cached source tensor ``key`` for every row of the batch, on ``like``'s device and dtype."""
        t = self.cached.get(key)
        if t is None:
            raise RuntimeError(f"PlugKitPnPInject: the source cache holds no {key[0]} for decoder block "
                               f"{key[1]}; set source_mode to 'in-batch' (and report this).")
        t = t.to(device=like.device, dtype=like.dtype, non_blocking=True)
        idx = self.cached_index if self.cached_index.device == t.device else self.cached_index.to(t.device)
        return t.index_select(0, idx)


def current_call() -> Optional[InjectionCall]:
    return _CALL.get()


class call_scope:
    """``with call_scope(call): ...`` publishes ``call`` to the hooks and always withdraws it."""

    def __init__(self, call: InjectionCall):
        self.call = call
        self.token = None

    def __enter__(self):
        self.token = _CALL.set(self.call)
        return self.call

    def __exit__(self, *exc):
        _CALL.reset(self.token)
        return False


# ---- model checks ---------------------------------------------------------------------------------

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
    """``"4"``, ``"4-11"``, ``"1, 3-5"`` or ``"none"`` -> sorted decoder block indices."""
    text = (text or "").strip().lower()
    if text in ("none", "-"):
        return ()
    out: set[int] = set()
    for part in text.replace(";", ",").split(","):
        part = part.strip().removeprefix("output.").removeprefix("output_blocks.")
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(p) for p in part.split("-", 1))
                rng = range(a, b + 1)
            else:
                rng = range(int(part), int(part) + 1)
        except ValueError:
            raise ValueError(
                f"{node}: input '{name}' has {part!r}; write decoder block indices like '4', '4-11' or '1, 3-5'."
            ) from None
        for i in rng:
            if not 0 <= i < n_blocks:
                raise ValueError(f"{node}: input '{name}': decoder block {i} does not exist (this U-Net has 0-{n_blocks - 1}).")
            out.add(i)
    return tuple(sorted(out))


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


# ---- hooks ----------------------------------------------------------------------------------------

class FeatureInjectionResBlock(ResBlock):
    """A ResBlock that shares every layer of ``block`` and can overwrite target rows' features.

    Its children are the original block's own modules (same parameters, same state-dict keys), so
    weight patches (LoRA), device moves and offloading act on it exactly as on the original. With
    no active ``InjectionCall`` it calls the original block's forward (bit-identical output).
    """

    def __init__(self, block: ResBlock, block_id: int):
        torch.nn.Module.__init__(self)
        if type(block) is not ResBlock and not isinstance(block, FeatureInjectionResBlock):
            raise TypeError(f"feature injection supports plain ResBlocks, not {type(block).__name__}")
        inner = block._plain if isinstance(block, FeatureInjectionResBlock) else block
        for name, value in vars(inner).items():
            if not name.startswith("_") and not isinstance(value, torch.nn.Module):
                setattr(self, name, value)
        for name, child in inner.named_children():
            self.add_module(name, child)
        self._plain_ref = (inner,)  # a tuple: not registered as a child (no duplicate parameters)
        self.block_id = int(block_id)

    @property
    def _plain(self) -> ResBlock:
        return self._plain_ref[0]

    def _residual(self, x, emb):
        """(x after the block's resampling, the residual branch) -- ResBlock._forward (ComfyUI 0.3.75)
        up to the skip add."""
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_rest(x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = in_conv(h)
        else:
            h = self.in_layers(x)
        emb_out = None
        if not self.skip_t_emb:
            emb_out = self.emb_layers(emb).type(h.dtype)
            while len(emb_out.shape) < len(h.shape):
                emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            h = out_norm(h)
            if emb_out is not None:
                scale, shift = torch.chunk(emb_out, 2, dim=1)
                h *= (1 + scale)
                h += shift
            h = out_rest(h)
        else:
            if emb_out is not None:
                if self.exchange_temb_dims:
                    emb_out = emb_out.movedim(1, 2)
                h = h + emb_out
            h = self.out_layers(h)
        return x, h

    def forward(self, x, emb):
        call = _CALL.get()
        if call is None or not (call.features or call.observe is not None) or x.shape[0] != call.n_total:
            return self._plain(x, emb)
        if call.observe is not None:  # PlugKitFeatureMap: every row's own features
            x, h = self._residual(x, emb)
            call.observe("features", self.block_id, h)
            if call.features and call.index is not None:
                h = call.take(h)
                call.features_taken += 1
            return self.skip_connection(x) + h
        if call.cached is not None:  # cache hit: every row takes the cached source features
            if self.updown:
                x = self.x_upd(x)
            skip = self.skip_connection(x)
            call.features_taken += 1
            return skip + call.from_cache(("features", self.block_id), skip)
        if call.index is None:
            return self._plain(x, emb)
        # in-batch: the target rows' residual branch is overwritten, so only the source rows compute it
        n = call.n_target
        emb_src = emb[n:] if torch.is_tensor(emb) and emb.dim() > 0 and emb.shape[0] == x.shape[0] else emb
        _, h_src = self._residual(x[n:], emb_src)
        if call.record is not None:
            call.record[("features", self.block_id)] = h_src
        if self.updown:
            x = self.x_upd(x)
        idx = call.index if call.index.device == h_src.device else call.index.to(h_src.device)
        call.features_taken += 1
        return self.skip_connection(x) + h_src.index_select(0, idx - n)


class AttentionInjection:
    """attn1 replace: target rows take the source row's q and k; v stays their own."""

    def __init__(self, previous: Optional[Callable] = None):
        self.previous = previous

    def __repr__(self) -> str:
        return f"AttentionInjection(previous={self.previous!r})"

    def __call__(self, q, k, v, extra_options):
        call = _CALL.get()
        if call is not None and q.shape[0] == call.n_total:
            if call.observe is not None:
                call.observe("attention", extra_options.get("block"), q, k, extra_options)
            if call.attention and call.cached is not None:  # cache hit
                where = (tuple(extra_options.get("block") or ()), int(extra_options.get("block_index", 0)))
                q = call.from_cache(("q",) + where, q)
                k = call.from_cache(("k",) + where, k)
            elif call.attention and call.index is not None:
                if call.record is not None:
                    where = (tuple(extra_options.get("block") or ()), int(extra_options.get("block_index", 0)))
                    call.record[("q",) + where] = q[call.n_target:]
                    call.record[("k",) + where] = k[call.n_target:]
                q = call.take(q)
                k = call.take(k)
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return comfy_attention.optimized_attention(
            q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
            transformer_options=extra_options,
        )


# ---- per-run state and the wrappers ---------------------------------------------------------------

def _same_sigma(a: float, b: float, rtol: float = 1e-5) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-8)


@dataclass
class PnPRun:
    """State of one sampling run (built in OUTER_SAMPLE, gone after it).

    ``offset``: the trajectory step of the run's first sigma (0 for a whole run, k for a run that
    starts at ``start_at_step`` k or a SplitSigmas low half). ``extra``: for two-stage samplers, the
    number of evaluations after each step's callback (``extra_evaluations``); with it the step of
    an evaluation is counted from the callbacks (the first ``extra[i]`` evaluations after callback
    i belong to step i, the next one starts step i+1), otherwise it is the trajectory step of its
    sigma. ``current``: (sigma, trajectory step) of the evaluation in progress.
    """

    source: Any  # PnPSource
    feature_share: float
    attention_share: float
    offset: int = 0
    extra: Optional[list] = None
    callback_step: Optional[int] = None
    since_callback: int = 0
    current: Optional[tuple] = None
    trajectory: Optional[SourceTrajectory] = None
    kwargs_cache: dict = field(default_factory=dict)
    warned: set = field(default_factory=set)
    calls_injected: int = 0
    steps_injected: list = field(default_factory=list)
    cache: Any = None  # the source's SourceCache (source_mode 'cache' / 'cache on CPU'), else None
    feature_keys: tuple = ()  # the cache layers a feature-window / attention-window call needs
    attention_keys: tuple = ()
    cache_hits: int = 0  # model calls served from the cache (no source rows)
    cache_stores: int = 0  # model calls that ran the source in-batch and filled the cache

    def warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning(msg, *args)

    def trajectory_on(self, device) -> SourceTrajectory:
        if self.trajectory is None or self.trajectory.device != torch.device(device):
            self.trajectory = self.source.trajectory.to(device)
        return self.trajectory

    def begin_evaluation(self, sigma: float) -> int:
        """Record the trajectory step of a model evaluation at ``sigma`` and return it."""
        if self.extra is not None:
            i = self.callback_step
            if i is None:
                run_step = 0
            elif self.since_callback < (self.extra[i] if i < len(self.extra) else 0):
                run_step = i
            else:
                run_step = i + 1
            self.since_callback += 1
            step = self.offset + run_step
        else:
            step = step_index(sigma, self.source.trajectory.sigmas)
        self.current = (sigma, step)
        return step

    def on_callback(self, i: int) -> None:
        """The sampler's step callback: step ``i`` (of this run) made its first evaluation."""
        self.callback_step = int(i)
        self.since_callback = 0

    def step_of(self, sigma: float) -> int:
        if self.current is not None and _same_sigma(self.current[0], sigma):
            return self.current[1]
        return step_index(sigma, self.source.trajectory.sigmas)

    def windows(self, sigma: float) -> tuple[bool, bool]:
        """(features, attention) for a call at ``sigma``: the trajectory step (absolute, as the
        official compares absolute timesteps) against ``int(n * share)`` of the trajectory's n steps."""
        n = max(self.source.trajectory.sigmas.numel() - 1, 1)
        i = self.step_of(sigma)
        return i < injection_steps(n, self.feature_share), i < injection_steps(n, self.attention_share)


def _cached_index(entry: dict, n: int, transformer_options: dict) -> Optional[torch.Tensor]:
    """For a cache hit: the cached source row of each of the ``n`` batch rows (as in ``_extend``),
    or None when the cached rows do not fit this batch's chunks."""
    n_src = next(iter(entry.values())).shape[0] if entry else 1
    chunks = max(len(transformer_options.get("cond_or_uncond", [0])), 1)
    chunk = n // chunks if (n // chunks) * chunks == n else n
    if chunk % n_src != 0:
        return None
    return (torch.arange(n) % chunk) % n_src


def _pad_control(control, n_extra: int):
    if control is None:
        return None
    out = {}
    for key, value in control.items():
        if isinstance(value, list):
            padded = []
            for c in value:
                if torch.is_tensor(c):
                    c = torch.cat([c, c.new_zeros((n_extra,) + tuple(c.shape[1:]))])
                padded.append(c)
            out[key] = padded
        else:
            out[key] = value
    return out


def _repeat_tokens(c: torch.Tensor, length: int) -> torch.Tensor:
    return c if c.shape[1] == length else c.repeat(1, length // c.shape[1], 1)


class PnPApplyModelWrapper:
    """APPLY_MODEL wrapper: adds the source chunk inside injection windows, nothing outside them."""

    def __repr__(self) -> str:
        return "PnPApplyModelWrapper()"

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        run: Optional[PnPRun] = transformer_options.get(RUN_KEY)
        if run is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        sigma = float(t.flatten()[0])
        features, attention = run.windows(sigma)
        if not (features or attention):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if run.source.trajectory.index_of(sigma) is None:
            run.warn_once("chord", "PlugKitPnPInject: the sampler evaluates the model at sigma %.5g, between the "
                          "inversion's sigmas (a two-stage sampler such as dpm_2, dpmpp_2s_ancestral, dpmpp_sde); "
                          "there the source latent is interpolated on the chord between its neighbours (exact "
                          "only when each step was inverted in one evaluation). ddim, euler, heun, dpmpp_2m, "
                          "uni_pc evaluate only on the schedule.", sigma)
        n = x.shape[0]
        if run.cache is not None and tuple(x.shape[1:]) == tuple(run.source.trajectory.shape[1:]):
            needed = (run.feature_keys if features else ()) + (run.attention_keys if attention else ())
            entry = run.cache.lookup(sigma, needed)
            index = _cached_index(entry, n, transformer_options) if entry is not None else None
            if index is not None:  # the source branch at this sigma is cached: the plain batch runs
                run.calls_injected += 1
                run.cache_hits += 1
                run.steps_injected.append((run.step_of(sigma), features, attention))
                with call_scope(InjectionCall(n_total=n, index=None, features=features, attention=attention,
                                              n_target=n, cached=entry, cached_index=index.to(x.device))) as call:
                    out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
                if features and call.features_taken == 0:
                    raise RuntimeError(bypassed_features_message(transformer_options))
                return out
        extended = self._extend(run, x, t, c_concat, c_crossattn, control, transformer_options, kwargs)
        if extended is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        x2, t2, c_concat2, c_crossattn2, control2, options2, kwargs2, index = extended
        run.calls_injected += 1
        run.steps_injected.append((run.step_of(sigma), features, attention))
        record = {} if run.cache is not None else None
        with call_scope(InjectionCall(n_total=x2.shape[0], index=index, features=features, attention=attention,
                                      n_target=n, record=record)) as call:
            out = executor(x2, t2, c_concat2, c_crossattn2, control2, options2, **kwargs2)
        if features and call.index is not None and call.features_taken == 0:
            raise RuntimeError(bypassed_features_message(options2))
        if record:
            run.cache.store(sigma, record)
            run.cache_stores += 1
        return out[:n]

    @staticmethod
    def _extend(run: PnPRun, x, t, c_concat, c_crossattn, control, transformer_options, kwargs):
        source = run.source
        src_shape = source.trajectory.shape
        if tuple(x.shape[1:]) != tuple(src_shape[1:]):
            run.warn_once("area", "PlugKitPnPInject: a model call on a %s crop (area conditioning?) "
                          "does not match the source latent %s; that call runs without injection.",
                          tuple(x.shape[1:]), tuple(src_shape[1:]))
            return None
        n = x.shape[0]
        cond_or_uncond = list(transformer_options.get("cond_or_uncond", [0]))
        chunks = max(len(cond_or_uncond), 1)
        chunk = n // chunks
        if chunk * chunks != n:
            chunk = n
        s = src_shape[0]
        # one source row per source item, shared by every chunk (cond, uncond) and by every batch row
        # it serves: a batch of B on one source adds 1 row, not B identical ones (2B+1 rows, not 3B)
        n_src = s if chunk % s == 0 else chunk
        rows = torch.arange(n_src) % s
        sigma = float(t.flatten()[0])
        traj = run.trajectory_on(x.device)
        src_x = traj.at(sigma).index_select(0, rows.to(traj.device)).to(device=x.device, dtype=x.dtype)
        x2 = torch.cat([x, src_x])
        t2 = torch.cat([t, t[:1].expand(n_src)])
        src_kw = source.model_kwargs
        if c_crossattn is not None:
            src_c = src_kw.get("c_crossattn")
            if src_c is None:
                run.warn_once("ctx", "PlugKitPnPInject: the source has no cross-attention context; injection skipped.")
                return None
            src_c = src_c.index_select(0, rows).to(device=c_crossattn.device, dtype=c_crossattn.dtype)
            length = math.lcm(c_crossattn.shape[1], src_c.shape[1])
            c_crossattn2 = torch.cat([_repeat_tokens(c_crossattn, length), _repeat_tokens(src_c, length)])
        else:
            c_crossattn2 = None
        if c_concat is not None:
            src_cc = src_kw.get("c_concat")
            if src_cc is None:
                run.warn_once("concat", "PlugKitPnPInject: the model takes concat conditioning (inpainting?) "
                              "that the source was not inverted with; injection skipped.")
                return None
            c_concat2 = torch.cat([c_concat, src_cc.index_select(0, rows % src_cc.shape[0]).to(c_concat)])
        else:
            c_concat2 = None
        kwargs2 = {}
        for key, value in kwargs.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n:
                src_v = src_kw.get(key)
                if not torch.is_tensor(src_v):
                    run.warn_once("kw:" + key, "PlugKitPnPInject: the model input %r has no source counterpart; "
                                  "injection skipped.", key)
                    return None
                src_v = src_v.index_select(0, rows % src_v.shape[0]).to(device=value.device, dtype=value.dtype)
                kwargs2[key] = torch.cat([value, src_v])
            else:
                kwargs2[key] = value
        options2 = dict(transformer_options)
        if n_src == chunk:
            # the source rows form one more chunk of the same size (a cond chunk, as the source prompt is one)
            options2["cond_or_uncond"] = cond_or_uncond + [0]
            if "uuids" in transformer_options:
                options2["uuids"] = list(transformer_options["uuids"]) + [SOURCE_UUID]
        # else (one shared source row for chunks of B > 1 rows): the row trails the batch outside the chunks;
        # a patch that splits rows by len(cond_or_uncond) (x.shape[0] // chunks) still finds its chunks
        index = torch.cat([n + (torch.arange(n) % chunk) % n_src, torch.arange(n, n + n_src)]).to(x.device)
        return x2, t2, c_concat2, c_crossattn2, _pad_control(control, n_src), options2, kwargs2, index


def bypassed_features_message(transformer_options: dict) -> str:
    """Why the feature injection did not run: most likely another node's ``forward_timestep_embed_patch``
    that handles ResBlocks itself (ComfyUI calls it instead of the block's forward)."""
    patches = (transformer_options.get("patches") or {}).get("forward_timestep_embed_patch") or []
    others = [f"{getattr(cls, '__name__', cls)} -> {getattr(h, '__qualname__', type(h).__name__)}"
              for cls, h in patches if isinstance(cls, type) and issubclass(FeatureInjectionResBlock, cls)]
    culprit = (f"another node's forward_timestep_embed_patch handles ResBlocks itself ({', '.join(others)}), "
               "so ComfyUI never calls the block PnP patched") if others else \
        "something replaced the patched decoder ResBlock's forward (another node's model patch)"
    return ("PlugKitPnPInject: the feature injection did not run inside its window: " + culprit + ". "
            "Remove that node from the model chain for PnP runs, or set feature_injection to 0 "
            "(attention injection alone still works).")


class PnPPredictNoiseWrapper:
    """PREDICT_NOISE wrapper: one call per model evaluation; records its trajectory step."""

    def __repr__(self) -> str:
        return "PnPPredictNoiseWrapper()"

    def __call__(self, executor, x, timestep, model_options={}, seed=None):
        run: Optional[PnPRun] = model_options.get("transformer_options", {}).get(RUN_KEY)
        if run is None:
            return executor(x, timestep, model_options, seed)
        run.begin_evaluation(float(timestep.flatten()[0]))
        try:
            return executor(x, timestep, model_options, seed)
        finally:
            run.current = None


def check_schedule(source, noise: torch.Tensor, sigmas, node: str) -> int:
    """The run's offset on the source trajectory, or a clear error when the run leaves it."""
    traj = source.trajectory
    fix = (f"sample with scheduler '{source.scheduler}' and {source.steps} steps (KSamplerAdvanced: add_noise "
           f"disable, start_at_step 0; KSampler always adds noise; dpm_2, dpm_2_ancestral, uni_pc and uni_pc_bh2 "
           f"drop a sigma there), or connect the sampler's SIGMAS (SamplerCustom) to PlugKitPnPInvert's 'sigmas' "
           f"input so the source is inverted on exactly them")
    if source.scheduler == "custom SIGMAS":
        fix = ("sample with the SIGMAS that were connected to PlugKitPnPInvert (SamplerCustom, add_noise off), or "
               "connect the sampler's own SIGMAS there")
    if noise is not None and torch.is_tensor(noise) and bool(torch.count_nonzero(noise)):
        raise ValueError(
            f"{node}: the sampler adds noise to the inverted latent (KSampler, or add_noise enabled), so the run "
            f"leaves the source's trajectory and the injected features belong to another image. Fix: "
            f"KSamplerAdvanced with add_noise 'disable' (SamplerCustom: add_noise off)."
        )
    sig = torch.as_tensor(sigmas).detach().float().cpu().flatten()
    offset = schedule_offset(sig, traj.sigmas)
    if offset is None:
        raise ValueError(
            f"{node}: the sampler's sigmas {describe_sigmas(sig)} are not on the schedule 'pnp_source' was "
            f"inverted on ({source.scheduler}: {describe_sigmas(traj.sigmas)}); the source latents exist only at "
            f"the inversion's sigmas. Fix: {fix}."
        )
    return offset


CALLBACK_INDEX = 5  # CFGGuider.outer_sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, ...)


def _with_step_callback(run: PnPRun, args: tuple, kwargs: dict):
    """The outer_sample arguments with a callback that also tells ``run`` each finished first evaluation."""
    args = list(args)
    if len(args) > CALLBACK_INDEX:
        user = args[CALLBACK_INDEX]
    else:
        user = kwargs.get("callback")

    def callback(step, x0, x, total):
        run.on_callback(step)
        if user is not None:
            return user(step, x0, x, total)

    if len(args) > CALLBACK_INDEX:
        args[CALLBACK_INDEX] = callback
    else:
        kwargs = dict(kwargs, callback=callback)
    return tuple(args), kwargs


SOURCE_MODES = ("in-batch", "cache", "cache on CPU")


def _identity_parts(model_patcher, model_options: dict):
    """(key, strong refs) of what the source branch's tensors depend on besides the source itself:
    the base model, its weight patches (``patches_uuid``) and dtype, and every other node's object
    patch, transformer patch, attention replace, wrapper and model function wrapper (by identity;
    PnP's own hooks are left out, they do not change the source rows)."""
    base = model_patcher.model
    key = [("model", id(base)), ("weights", str(getattr(model_patcher, "patches_uuid", None))),
           ("dtype", str(model_patcher.model_dtype()), str(getattr(base, "manual_cast_dtype", None)))]
    refs = []

    def add(kind, name, obj):
        while isinstance(obj, AttentionInjection):
            obj = obj.previous
        if obj is None or isinstance(obj, (FeatureInjectionResBlock, PnPMemoryEstimate)):
            return
        key.append((kind, repr(name), id(obj)))
        refs.append(obj)

    for name, obj in model_patcher.object_patches.items():
        add("object", name, obj)
    to = model_options.get("transformer_options", {}) or {}
    for name, lst in (to.get("patches") or {}).items():
        for i, f in enumerate(lst):
            add("patch", (name, i), f)
    for name, d in (to.get("patches_replace") or {}).items():
        for where, f in d.items():
            add("replace", (name, where), f)
    for wtype, d in (to.get("wrappers") or {}).items():
        for wkey, lst in d.items():
            if wkey != WRAPPER_KEY:
                for i, f in enumerate(lst):
                    add("wrapper", (wtype, wkey, i), f)
    add("model_function_wrapper", "", model_options.get("model_function_wrapper"))
    return tuple(sorted(key, key=repr)), refs


def cache_layers(feature_blocks, attention_layers) -> tuple[tuple, tuple]:
    """The cache keys a feature-window call and an attention-window call need."""
    feats = tuple(("features", int(i)) for i in feature_blocks)
    attn = tuple((kind, ("output", int(i)), int(j)) for i, j in attention_layers for kind in ("q", "k"))
    return feats, attn


class PnPSampleWrapper:
    """OUTER_SAMPLE wrapper: validates the run and owns its state (reset in ``finally``).

    Holds only configuration (shared by clones). With ``source_mode`` 'cache' / 'cache on CPU' the
    run uses the source's own ``SourceCache`` (kept with the PLUGKIT_PNP_SOURCE, keyed by the source's
    digest and the model's identity and patches): cached sigmas skip the source branch, the others run
    it in-batch and fill the cache.
    """

    def __init__(self, source, feature_share: float, attention_share: float, source_mode: str = "in-batch",
                 feature_keys: tuple = (), attention_keys: tuple = ()):
        self.source = source
        self.feature_share = float(feature_share)
        self.attention_share = float(attention_share)
        self.source_mode = source_mode
        self.feature_keys = tuple(feature_keys)
        self.attention_keys = tuple(attention_keys)

    def __repr__(self) -> str:
        return (f"PnPSampleWrapper(features={self.feature_share}, attention={self.attention_share}, "
                f"source_mode={self.source_mode!r})")

    def _cache_for(self, guider, node: str):
        mp = guider.model_patcher
        key, refs = _identity_parts(mp, guider.model_options)
        on_cpu = self.source_mode == "cache on CPU"
        key = (self.source.digest(), key, on_cpu)
        cache = self.source.cache
        model_ref = weakref.ref(mp.model)
        if cache.key == key and not (cache.refs and cache.refs[0]() is mp.model):
            cache.reset(None)  # same ids, another model object: never reuse
        if cache.reset(key, (model_ref, *refs), on_cpu):
            log.debug("%s: source cache found (%d sigmas, %.1f MiB)", node, len(cache.steps), cache.nbytes() / 2**20)
        return cache

    def __call__(self, executor, *args, **kwargs):
        guider = executor.class_obj
        names = ("noise", "latent_image", "sampler", "sigmas")
        got = {name: (args[i] if len(args) > i else kwargs.get(name)) for i, name in enumerate(names)}
        noise = got["noise"]
        node = "PlugKitPnPInject"
        self.source.check_run(tuple(noise.shape), node)
        offset = check_schedule(self.source, noise, got["sigmas"], node)
        sampler_fn = getattr(got["sampler"], "sampler_function", None)
        extra = extra_evaluations(getattr(sampler_fn, "__name__", ""), got["sigmas"])
        run = PnPRun(self.source, self.feature_share, self.attention_share, offset=offset, extra=extra,
                     feature_keys=self.feature_keys, attention_keys=self.attention_keys)
        if self.source_mode != "in-batch":
            run.cache = self._cache_for(guider, node)
        if extra is not None:
            args, kwargs = _with_step_callback(run, args, kwargs)
        orig_model_options = guider.model_options
        try:
            guider.model_options = comfy.model_patcher.create_model_options_clone(orig_model_options)
            guider.model_options.setdefault("transformer_options", {})[RUN_KEY] = run
            out = executor(*args, **kwargs)
            log.debug("%s: %d model calls injected (steps %s), %d from the source cache", node, run.calls_injected,
                      sorted({s for s, _, _ in run.steps_injected}), run.cache_hits)
            if run.cache is not None:
                c = run.cache
                log.info("%s: source cache: %d sigmas, %.1f MiB (%s) on %s; this run: %d calls from the cache, "
                         "%d ran the source branch", node, len(c.steps), c.nbytes() / 2**20, "/".join(c.dtypes()) or "-",
                         "the CPU" if c.on_cpu else "the model's device", run.cache_hits, run.cache_stores)
            return out
        finally:
            guider.model_options = orig_model_options


class PnPMemoryEstimate:
    """Object patch on the base model's ``memory_required``: ComfyUI's estimate of a U-Net call, plus
    the source rows PnP adds to every call inside a window (``rows``: the source's batch, 1 for a
    shared source). ComfyUI sizes its cond/uncond batches (``_calc_cond_batch``) and the model load
    (``prepare_sampling``) from it. Conservative: the rows are counted at every call, also outside the
    windows and where the source cache serves them."""

    def __init__(self, previous: Callable, rows: int):
        self.previous = previous
        self.rows = int(rows)

    def __repr__(self) -> str:
        return f"PnPMemoryEstimate(rows={self.rows})"

    def __call__(self, input_shape, cond_shapes={}):
        shape = list(input_shape)
        shape[0] = int(shape[0]) + self.rows
        return self.previous(shape, cond_shapes=cond_shapes)


class PnPPrepareSamplingWrapper:
    """PREPARE_SAMPLING wrapper: ComfyUI estimates the run's memory from the noise shape before the
    model (and so ``PnPMemoryEstimate``) is patched in; there the batch counts the source rows too."""

    def __init__(self, rows: int):
        self.rows = int(rows)

    def __repr__(self) -> str:
        return f"PnPPrepareSamplingWrapper(rows={self.rows})"

    def __call__(self, executor, model, noise_shape, conds, *args, **kwargs):
        if not isinstance(getattr(model.model, "memory_required", None), PnPMemoryEstimate):
            noise_shape = [int(noise_shape[0]) + self.rows] + list(noise_shape[1:])
        return executor(model, noise_shape, conds, *args, **kwargs)


MEMORY_KEY = "memory_required"


def remove_memory_estimate(m) -> None:
    """Undo ``PnPMemoryEstimate`` on clone ``m`` (keeping another node's patch it wrapped)."""
    est = m.object_patches.get(MEMORY_KEY)
    if isinstance(est, PnPMemoryEstimate):
        previous = est.previous
        if getattr(previous, "__self__", None) is m.model:
            del m.object_patches[MEMORY_KEY]
        else:
            m.object_patches[MEMORY_KEY] = previous


def install(m, source, feature_share: float, attention_share: float,
            feature_blocks: tuple[int, ...], attention_blocks: tuple[int, ...], source_mode: str = "in-batch") -> None:
    """Install the hooks on ``m`` (a clone). Nothing is installed for a zero window."""
    unet = m.get_model_object("diffusion_model")
    injected_features, injected_layers = [], []
    if feature_share > 0:
        for i in feature_blocks:
            key = f"diffusion_model.output_blocks.{i}.0"
            m.add_object_patch(key, FeatureInjectionResBlock(m.get_model_object(key), i))
            injected_features.append(i)
    if attention_share > 0:
        replaces = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
        for i in attention_blocks:
            for j in range(attention_depth(unet, i)):
                previous = replaces.get(("output", i, j), replaces.get(("output", i)))
                m.set_model_attn1_replace(AttentionInjection(previous), "output", i, j)
                injected_layers.append((i, j))
    feature_keys, attention_keys = cache_layers(injected_features, injected_layers)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY,
                           PnPSampleWrapper(source, feature_share, attention_share, source_mode, feature_keys,
                                            attention_keys))
    rows = int(source.latent_shape[0])
    m.add_object_patch(MEMORY_KEY, PnPMemoryEstimate(m.get_model_object(MEMORY_KEY), rows))
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, WRAPPER_KEY,
                           PnPPrepareSamplingWrapper(rows))
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WRAPPER_KEY, PnPPredictNoiseWrapper())
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, PnPApplyModelWrapper())


def has_pnp(m) -> bool:
    return bool(m.get_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY))
