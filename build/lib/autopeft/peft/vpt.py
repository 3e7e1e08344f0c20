"""VPT-shallow (Jia et al., ECCV 2022) as PETITE uses it: prompt tokens from a chosen block on.

``[Z_s, E_s] = L_s([P, E_{s-1}])`` and ``[Z_i, E_i] = L_i([Z_{i-1}, E_{i-1}])`` for the later
prompted blocks: ``P`` (``tokens x C``, learned) is put in front of the token sequence entering
the first prompted block, its outputs ``Z`` are carried into the next prompted block, and only
``E`` (the image tokens) ever leaves a block. That last point is what makes the method fit any
encoder-decoder without changes to the network:

- UNETR (MONAI ViT): each block's output is both the next block's input and a hidden state that
  the decoder reshapes into a volume (skips from blocks 3, 6, 9); since prompts are stripped from
  every block output and re-attached at the next block's input, hidden states and the final
  token map hold exactly ``D*H*W`` tokens.
- CVT-GAN: the conv-projection attention runs depthwise convolutions on a 3D grid of tokens.
  Prompts must not enter that grid, so they are extra *tokens* in CvT's class-token convention:
  ``backbones/blocks/cvt.py`` lets leading tokens skip the depthwise convolutions and join
  attention (as queries, keys and values) and the MLP like any other token. The grid stays
  ``D*H*W`` and untouched; prompts read from and write to the image tokens only through attention,
  exactly as in a plain ViT. (Extra key/value-only tokens would also keep the grid, but would make
  prompts that are never updated by the blocks, which is prefix tuning, not VPT.)

Protocol a prompted site must follow: its module is called with the token sequence
``B x N x C`` as the first positional argument, returns ``B x N' x C`` tokens as one tensor, and
accepts leading tokens that have no place in the volume. ``C`` is read from the block's first
LayerNorm (or its first Linear).

Chains: the sites a plan entry matches are taken in forward order; the first ``skip_first`` are
left alone (PETITE: 1, "from the second encoder on"). The matched sites form stages: runs of
consecutive matched sites with the same ``Site.role`` and ``Site.stage`` (an encoder stage and the
decoder stage at the same resolution are different stages). Each stage with a non-zero token count
gets its own ``P`` (stages differ in width), carried through that stage's prompted blocks and
dropped after its last one. ``tokens`` is one count for every stage or one count per stage
(CVT-GAN in PETITE: ``[0, 8, 32]`` over its three encoder stages; UNETR: ``50``, one stage).

Prompts are initialised like ViT tokens (truncated normal, std 0.02); unlike the other methods
VPT changes the output from the start, and it is not linear, so merging leaves it in place.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autopeft.errors import PlanError
from autopeft.peft.base import InjectContext, MethodConfig, PeftLayer, PeftMethod, register_method

__all__ = ["VptConfig", "Vpt", "PromptChain"]


class PromptChain(PeftLayer):
    """Learned prompts of one chain of blocks and the forward hooks that carry them.

    Args:
        num_tokens: prompt tokens ``P``.
        dim: token width ``C``.
        num_sites: blocks in the chain.
    """

    def __init__(self, num_tokens: int, dim: int, num_sites: int) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(num_tokens, dim))
        nn.init.trunc_normal_(self.prompts, std=0.02)
        self.num_sites = num_sites
        self._carried: torch.Tensor | None = None

    def pre_hook(self, module: nn.Module, args: tuple, *, position: int) -> tuple:
        """Put the learned (first block) or carried (later blocks) prompts before the tokens."""
        if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
            raise TypeError(f"VPT expects {type(module).__name__} to take B x N x C tokens as its first positional argument.")
        tokens = args[0]
        if tokens.shape[-1] != self.prompts.shape[-1]:
            raise ValueError(f"VPT prompts have width {self.prompts.shape[-1]}, but the block got tokens of width {tokens.shape[-1]}.")
        if position == 0:
            lead = self.prompts.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        else:
            if self._carried is None:
                raise RuntimeError("VPT: a later prompted block ran before the first one of its chain.")
            lead = self._carried
        return (torch.cat([lead, tokens], dim=1),) + tuple(args[1:])

    def post_hook(self, module: nn.Module, args: tuple, output: torch.Tensor, *, position: int) -> torch.Tensor:
        """Split the block output into prompt outputs (kept for the next block) and image tokens."""
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"VPT expects {type(module).__name__} to return one tensor, but got {type(output).__name__}.")
        count = self.prompts.shape[0]
        # The last block of the chain drops them, which also frees the autograd graph they hold.
        self._carried = output[:, :count] if position < self.num_sites - 1 else None
        return output[:, count:]

    def attach(self, module: nn.Module, position: int) -> None:
        module.register_forward_pre_hook(functools.partial(self.pre_hook, position=position))
        module.register_forward_hook(functools.partial(self.post_hook, position=position))


@dataclass(frozen=True)
class VptConfig(MethodConfig):
    """Hyperparameters of VPT-shallow."""

    tokens: int | tuple[int, ...] = field(
        default=50, metadata={"help": "prompt tokens: one count for all stages, or one per stage of the matched sites."}
    )
    skip_first: int = field(default=1, metadata={"help": "leading matched sites (forward order) left without prompts."})

    def __post_init__(self) -> None:
        counts = (self.tokens,) if isinstance(self.tokens, int) else tuple(self.tokens)
        if not counts or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            raise ValueError(f"`tokens` must be a non-negative integer or a list of them, but got {self.tokens!r}.")
        if not any(counts):
            raise ValueError(f"`tokens` must put at least one prompt somewhere, but got {self.tokens!r}.")
        if not isinstance(self.tokens, int):
            object.__setattr__(self, "tokens", counts)
        if isinstance(self.skip_first, bool) or not isinstance(self.skip_first, int) or self.skip_first < 0:
            raise ValueError(f"`skip_first` must be a non-negative integer, but got {self.skip_first!r}.")


def _token_width(module: nn.Module) -> int | None:
    for layer in module.modules():
        if isinstance(layer, nn.LayerNorm) and len(layer.normalized_shape) == 1:
            return layer.normalized_shape[0]
        if isinstance(layer, nn.Linear):
            return layer.in_features
    return None


def _chains(sites: Sequence) -> list[list]:
    """Runs of consecutive matched sites (forward order) sharing role and stage: one prompt each."""
    chains: list[list] = []
    for site in sites:
        if chains and (chains[-1][-1].role, chains[-1][-1].stage) == (site.role, site.stage):
            chains[-1].append(site)
        else:
            chains.append([site])
    return chains


@register_method
class Vpt(PeftMethod):
    """VPT-shallow over the matched vit sites; trains one prompt matrix per prompted stage."""

    name = "vpt"
    site_kinds = ("vit",)
    config_class = VptConfig
    mergeable = False
    identity_at_init = False
    switchable = False  # prompts lengthen every prompted block's token sequence: no value of them is the identity
    # The first prompted stage of a group whose vit sites form several stages (earlier stages get
    # no prompts), or the first prompted block of a group of one stage (``skip_first``).
    space_params = ("first_stage",)

    def from_space(self, values: Mapping[str, Any], sites: Sequence) -> dict[str, Any]:
        values = dict(values)
        if "first_stage" not in values:
            return values
        first = int(values.pop("first_stage"))
        stages = len(_chains([s for s in sites if s.kind == "vit"]))
        if stages > 1:
            first = min(first, stages - 1)
            values["tokens"] = [0] * first + [int(values.get("tokens", 50))] * (stages - first)
            values["skip_first"] = 0
        else:
            values["skip_first"] = first
        return values

    def prepare(self, sites: Sequence, config: VptConfig, context: InjectContext) -> None:
        chains = _chains(sites)
        if isinstance(config.tokens, int):
            counts = [config.tokens] * len(chains)
        elif len(config.tokens) != len(chains):
            described = "; ".join(", ".join(s.name for s in chain) for chain in chains)
            raise PlanError(
                f"VPT `tokens` lists {len(config.tokens)} counts, but the matched sites form {len(chains)} stages "
                f"({described}); give one count per stage or a single count."
            )
        else:
            counts = list(config.tokens)
        skipped = {site.name for site in list(sites)[: config.skip_first]}
        if len(skipped) == len(sites):
            raise PlanError(
                f"VPT `skip_first` = {config.skip_first} skips all {len(sites)} matched sites; lower it or match more sites."
            )
        assignments: dict[str, tuple[PromptChain, int]] = context.scratch.setdefault("vpt", {})
        for chain_sites, count in zip(chains, counts):
            chain_sites = [s for s in chain_sites if s.name not in skipped]
            if not chain_sites or count == 0:
                continue
            widths = {s.name: _token_width(s.module) for s in chain_sites}
            if None in widths.values() or len(set(widths.values())) != 1:
                raise PlanError(f"VPT needs blocks of one token width in a stage, but got widths {widths}.")
            reference = next(chain_sites[0].module.parameters())
            chain = PromptChain(count, widths[chain_sites[0].name], len(chain_sites))
            chain.to(device=reference.device, dtype=reference.dtype)
            for position, site in enumerate(chain_sites):
                assignments[site.name] = (chain, position)

    def inject(self, site, config: VptConfig, context: InjectContext) -> list[nn.Parameter]:
        entry = context.scratch.get("vpt", {}).get(site.name)
        if entry is None:
            return []  # skipped (skip_first) or in a stage with no tokens
        chain, position = entry
        if position == 0:
            if hasattr(site.module, "peft_prompts"):
                raise PlanError(f"Site {site.name!r} already has prompts; apply a plan to a fresh model.")
            site.module.add_module("peft_prompts", chain)
        chain.attach(site.module, position)
        return [chain.prompts] if position == 0 else []
