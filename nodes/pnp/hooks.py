"""Plug-and-Play injection hooks on a ComfyUI U-Net (host side: imports ComfyUI).

How one sampling run works (see docs/pnp.md):

- ``PnPSampleWrapper`` (OUTER_SAMPLE) validates the run against the source (latent size, batch,
  model family, no added noise, sigmas on the inversion's schedule) and puts a fresh ``PnPRun`` into
  the run's own ``transformer_options`` (``run_state.run_scope``); the run's model options are
  restored afterwards, also when the run fails, so nothing survives the run.
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

Also here: the APPLY_MODEL wrapper that captures the source's U-Net inputs during inversion, the
feature-map probe's patches, and ``plain_clone`` (a model without PnP's hooks, for inversion and probes).
"""
from __future__ import annotations

import contextvars
import logging
import math
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.patcher_extension
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

from ..run_state import run_scope, run_state
from .blocks import attention_depth
from .ddim_inversion import SourceTrajectory, extra_evaluations, injection_steps, step_index
from .schedule import check_schedule
from .source_cache import cache_layers, cached_index, identity_parts

log = logging.getLogger(__name__)

WRAPPER_KEY = "plugkit_pnp"
RUN_KEY = "plugkit_pnp_run"
SOURCE_UUID = uuid.UUID("9b1c8d2e-5f1a-4c57-9a43-7f1d2a9c0e11")  # the source chunk's uuid in a batch

# The call in progress reaches the ResBlock object patch through a ContextVar: ResBlock.forward(x, emb)
# gets no transformer_options, and the call (which rows are source rows) belongs to one model call,
# not to the run (PnPRun) nor to the patch objects that clones share.
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
        run: Optional[PnPRun] = run_state(transformer_options, RUN_KEY)
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
            index = cached_index(entry, n, transformer_options) if entry is not None else None
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
        run: Optional[PnPRun] = run_state(model_options, RUN_KEY)
        if run is None:
            return executor(x, timestep, model_options, seed)
        run.begin_evaluation(float(timestep.flatten()[0]))
        try:
            return executor(x, timestep, model_options, seed)
        finally:
            run.current = None


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


class PnPSampleWrapper:
    """OUTER_SAMPLE wrapper: validates the run and owns its state (``run_scope``: gone after the run).

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
        key, refs = identity_parts(mp, guider.model_options, WRAPPER_KEY, unwrap=(AttentionInjection,),
                                   skip=(FeatureInjectionResBlock, PnPMemoryEstimate))
        on_cpu = self.source_mode == "cache on CPU"
        cache = self.source.cache
        if cache.use((self.source.digest(), key, on_cpu), mp.model, refs, on_cpu):
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
        with run_scope(guider, RUN_KEY, run):
            out = executor(*args, **kwargs)
        log.debug("%s: %d model calls injected (steps %s), %d from the source cache", node, run.calls_injected,
                  sorted({s for s, _, _ in run.steps_injected}), run.cache_hits)
        if run.cache is not None:
            c = run.cache
            log.info("%s: source cache: %d sigmas, %.1f MiB (%s) on %s; this run: %d calls from the cache, "
                     "%d ran the source branch", node, len(c.steps), c.nbytes() / 2**20, "/".join(c.dtypes()) or "-",
                     "the CPU" if c.on_cpu else "the model's device", run.cache_hits, run.cache_stores)
        return out


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


PNP_WRAPPER_TYPES = (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, comfy.patcher_extension.WrappersMP.PREDICT_NOISE,
                     comfy.patcher_extension.WrappersMP.APPLY_MODEL, comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING)
CAPTURE_KEY = "plugkit_pnp_capture"


def plain_clone(model):
    """A clone without PlugKitPnPInject's wrappers (inversion and probes are not PnP runs)."""
    m = model.clone()
    for wtype in PNP_WRAPPER_TYPES:
        m.remove_wrappers_with_key(wtype, WRAPPER_KEY)
    remove_memory_estimate(m)
    return m


def capture_source_inputs(store: dict, run_model: bool = True):
    """APPLY_MODEL wrapper storing the first call's U-Net inputs (one row per item); with
    ``run_model=False`` the model is not evaluated (a probe that only needs the inputs)."""
    def capture(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        if not store:
            chunks = max(len(transformer_options.get("cond_or_uncond", [0])), 1)
            rows = x.shape[0] // chunks
            if torch.is_tensor(c_crossattn):
                store["c_crossattn"] = c_crossattn[:rows].detach().float().cpu()
            if torch.is_tensor(c_concat):
                store["c_concat"] = c_concat[:rows].detach().float().cpu()
            for key, value in kwargs.items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == x.shape[0]:
                    store[key] = value[:rows].detach().cpu()
        if not run_model:
            return torch.zeros_like(x)
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    return capture


def add_capture(m, store: dict, run_model: bool = True) -> None:
    """Install ``capture_source_inputs(store, run_model)`` on clone ``m``."""
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, CAPTURE_KEY,
                           capture_source_inputs(store, run_model))


def install_feature_map_probe(m, block: int, kind: str) -> None:
    """PlugKitFeatureMap's patch on clone ``m``: decoder block ``block``'s ResBlock (kind 'features')
    or its first self-attention layer, which report to the ``observe`` of the active call."""
    if kind == "features":
        key = f"diffusion_model.output_blocks.{block}.0"
        m.add_object_patch(key, FeatureInjectionResBlock(m.get_model_object(key), block))
    else:
        replaces = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
        previous = replaces.get(("output", block, 0), replaces.get(("output", block)))
        if isinstance(previous, AttentionInjection):
            previous = previous.previous
        m.set_model_attn1_replace(AttentionInjection(previous), "output", block, 0)
