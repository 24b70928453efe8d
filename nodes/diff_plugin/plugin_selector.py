"""Diff-Plugin's Plugin-Selector (``modules/prompt.py`` PromptTunnerModel, ``tunner_for_visual=True``) and
the official selection rule of ``demo.py``. No ComfyUI import.

Score of a plugin = exp(logit_scale) * cos(proj_v(max over tokens of its Fp), proj_t(pooled text)).
A null slot (the pooled text embedding of " ", placed where a plugin's Fp would be) is scored the same
way. Official rule: negative scores are clamped to 0 (the null gets 1 if all are 0); every plugin
scoring above 0 is applied, in the order the plugins were given; the null slot applies nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

RULE_OFFICIAL = "official (score > 0)"
RULE_ABOVE_NULL = "above null"
RULES = (RULE_OFFICIAL, RULE_ABOVE_NULL)
NULL_NAME = "null"


class PromptTuner(nn.Module):
    """Released key names: ``proj_v.{weight,bias}``, ``proj_t.{weight,bias}``, ``logit_scale``."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.proj_v = nn.Linear(dim, dim)
        self.proj_t = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, text_pooled: torch.Tensor, slot_prompts: torch.Tensor) -> torch.Tensor:
        """text_pooled [768] or [1, 768]; slot_prompts [S, N, 768] -> scores [S]."""
        dtype = self.proj_v.weight.dtype
        visual = slot_prompts.to(dtype).amax(dim=1)  # max-pool over tokens
        vis = self.proj_v(visual)
        vis = vis / vis.norm(dim=-1, keepdim=True)
        text = self.proj_t(text_pooled.to(dtype).reshape(1, -1))
        text = text / text.norm(dim=-1, keepdim=True)
        return self.logit_scale.exp() * (vis @ text.T).squeeze(-1)


@dataclass
class Selection:
    names: list[str]  # every slot, the null last
    scores: list[float]  # clamped as the official demo reports them
    raw_scores: list[float]
    selected: list[int]  # indices of the plugins to apply, in order (never the null)

    def report(self) -> str:
        lines = [f"{name}: {score:.2f}" + ("  <- selected" if i in self.selected else "")
                 for i, (name, score) in enumerate(zip(self.names, self.scores))]
        chosen = ", ".join(self.names[i] for i in self.selected) or "none (the null slot won: nothing to apply)"
        return "\n".join(lines + [f"selected: {chosen}"])


@torch.no_grad()
def select_plugins(tuner: PromptTuner, text_pooled: torch.Tensor, null_pooled: torch.Tensor,
                   plugin_prompts: list[torch.Tensor], names: list[str], rule: str = RULE_OFFICIAL) -> Selection:
    """plugin_prompts: each plugin's Fp for the image ([N, 768] or [1, N, 768])."""
    if len(plugin_prompts) != len(names):
        raise ValueError("select_plugins: one name per plugin prompt")
    if not plugin_prompts:
        raise ValueError("select_plugins: no candidate plugins")
    prompts = [p.reshape(-1, p.shape[-1]) for p in plugin_prompts]
    tokens = prompts[0].shape[0]
    null_slot = null_pooled.reshape(1, -1).expand(tokens, -1)
    slots = torch.stack([p.to(null_slot) for p in prompts] + [null_slot])
    raw = tuner(text_pooled, slots).float().cpu()
    scores = raw.clamp(min=0)
    if not bool(scores.any()):
        scores[-1] = 1.0
    if rule == RULE_OFFICIAL:
        selected = [i for i in range(len(prompts)) if scores[i] > 0]
    elif rule == RULE_ABOVE_NULL:
        selected = [i for i in range(len(prompts)) if raw[i] > raw[-1]]
    else:
        raise ValueError(f"select_plugins: unknown rule {rule!r}; use one of {RULES}")
    return Selection(names=list(names) + [NULL_NAME], scores=scores.tolist(), raw_scores=raw.tolist(), selected=selected)
