"""SH-PEFT (sparsity- and hybridity-inspired PEFT): tune only the most important single weights.

Every parameter tensor of the matched sites is a candidate (linear, conv, norm and bias entries
alike, as the paper extends selection "to all operations"). The importance scores from
:func:`autopeft.importance.compute_importance` are ranked over all candidates of one plan entry
together (one threshold for the entry, as the paper's single tau), and exactly the budgeted number
of entries is kept (:func:`top_k_masks`, deterministic ties).

How the mask is enforced: not by masking gradients of the full tensor (AdamW's decoupled weight
decay, momentum from earlier steps or any other optimizer would still move masked entries), but
by a delta parametrisation, ``w = w0 + scatter(index, values)``: the pre-trained tensor ``w0``
stays frozen and only the ``k`` selected ``values`` (initially zero) are parameters. Masked
weights are therefore not parameters at all and cannot move under any optimizer; weight decay on
``values`` pulls the selected weights back toward their pre-trained values. Trainable counts are
exactly ``k``. The parametrisation folds into plain weights at merge time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from autopeft.errors import PlanError
from autopeft.peft.base import InjectContext, MethodConfig, PeftLayer, PeftMethod, register_method

__all__ = ["ShPeftConfig", "ShPeft", "SparseDelta", "sparse_selection_from_state", "top_k_masks"]

_PARAMETRIZATION_INFIX = ".parametrizations."


class SparseDelta(PeftLayer):
    """Parametrisation ``w0 -> w0 + scatter(index, values)`` over the flattened tensor.

    Args:
        index: flat positions of the trainable entries, shape ``k`` (long).
        like: the tensor being parametrised (for dtype and device).
    """

    def __init__(self, index: torch.Tensor, like: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index.to(device=like.device, dtype=torch.long))
        self.values = nn.Parameter(torch.zeros(index.numel(), dtype=like.dtype, device=like.device))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original.reshape(-1).index_add(0, self.index, self.values).view_as(original)


@dataclass(frozen=True)
class ShPeftConfig(MethodConfig):
    """Budget of SH-PEFT: give exactly one of ``fraction`` and ``count``."""

    fraction: float | None = field(
        default=None, metadata={"help": "budget as a fraction of the pre-trained network's parameters, in (0, 1]."}
    )
    count: int | None = field(default=None, metadata={"help": "budget as an exact number of weights."})

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.count is None):
            raise ValueError(f"exactly one of `fraction` and `count` must be given, but got fraction={self.fraction!r}, count={self.count!r}.")
        if self.fraction is not None and (isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1):
            raise ValueError(f"`fraction` must be in (0, 1], but got {self.fraction!r}.")
        if self.count is not None and (isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1):
            raise ValueError(f"`count` must be a positive integer, but got {self.count!r}.")


def _candidates(sites: Sequence, context: InjectContext) -> list[tuple[str, nn.Parameter]]:
    seen: dict[str, nn.Parameter] = {}
    for site in sites:
        for p in site.module.parameters():
            if p.is_floating_point() and id(p) in context.param_names and id(p) not in context.unused:
                seen.setdefault(context.name_of(p), p)
    return list(seen.items())


def sparse_selection_from_state(tensor_names: Sequence[str], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter name -> selected flat indices, recovered from saved ``...parametrizations.<p>.0.index`` tensors."""
    selection: dict[str, torch.Tensor] = {}
    for name in tensor_names:
        if _PARAMETRIZATION_INFIX in name and name.endswith(".0.index"):
            owner, _, rest = name.partition(_PARAMETRIZATION_INFIX)
            selection[f"{owner}.{rest[: -len('.0.index')]}"] = tensors[name]
    return selection



def top_k_masks(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Boolean masks selecting exactly the ``k`` highest scores over all tensors together.

    Ties at the threshold are broken deterministically: by the order of ``scores`` (insertion
    order), then by flat position inside a tensor, earliest first.

    Args:
        scores: name -> importance tensor (any shapes).
        k: how many entries to keep, ``0 <= k <= total entries``.

    Returns:
        name -> bool tensor of the same shape, on the score's device; ``k`` True entries in total.

    >>> masks = top_k_masks({"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([3.0, 2.0])}, 2)
    >>> masks["a"].tolist(), masks["b"].tolist()
    ([False, True], [True, False])
    """
    names = list(scores)
    total = sum(scores[n].numel() for n in names)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= total:
        raise ValueError(f"`k` must be an integer in [0, {total}], but got {k!r}.")
    flat = torch.cat([scores[n].detach().reshape(-1).float().cpu() for n in names]) if names else torch.zeros(0)
    if torch.isnan(flat).any():
        raise ValueError("`scores` must not contain NaN.")
    keep = torch.zeros(total, dtype=torch.bool)
    if k > 0:
        # kthvalue gives the threshold in O(n) without sorting everything; entries above it are
        # kept, and the first (k - above) entries equal to it fill the budget exactly.
        threshold = torch.kthvalue(flat, total - k + 1).values
        keep = flat > threshold
        missing = k - int(keep.sum())
        ties = torch.nonzero(flat == threshold).flatten()[:missing]
        keep[ties] = True
    masks: dict[str, torch.Tensor] = {}
    offset = 0
    for name in names:
        size = scores[name].numel()
        masks[name] = keep[offset : offset + size].reshape(scores[name].shape).to(scores[name].device)
        offset += size
    return masks


@register_method
class ShPeft(PeftMethod):
    """Sparse selective tuning of the weights with the highest hybrid importance."""

    name = "shpeft"
    site_kinds = ("vit", "cnn")
    config_class = ShPeftConfig
    mergeable = True
    needs_importance = True

    def prepare(self, sites: Sequence, config: ShPeftConfig, context: InjectContext) -> None:
        candidates = _candidates(sites, context)
        chosen: dict[str, torch.Tensor] = context.scratch.setdefault("shpeft", {})
        if context.sparse_selection is not None:
            # Loading a checkpoint: the selection was made at training time and is in the file.
            for name, _ in candidates:
                if name in context.sparse_selection:
                    chosen[name] = context.sparse_selection[name]
            return
        if context.importance is None:
            raise PlanError(
                "SH-PEFT needs importance scores: compute them with autopeft.importance.compute_importance(model, "
                "batches, loss_fn) and pass apply_plan(model, plan, importance=scores)."
            )
        missing = [name for name, _ in candidates if name not in context.importance]
        if missing:
            raise PlanError(
                f"The importance scores lack {len(missing)} parameters of the SH-PEFT sites (e.g. {missing[0]!r}); "
                "compute them on this same pre-trained model, before any plan is applied."
            )
        total = sum(p.numel() for _, p in candidates)
        budget = config.count if config.count is not None else round(config.fraction * context.base_param_count)
        if not 1 <= budget <= total:
            raise PlanError(f"SH-PEFT budget of {budget} weights must be between 1 and the {total} weights of its sites.")
        scores = {}
        for name, p in candidates:
            score = context.importance[name]
            if score.shape != p.shape:
                raise PlanError(f"Importance of {name!r} has shape {tuple(score.shape)}, but the parameter has {tuple(p.shape)}.")
            scores[name] = score
        for name, mask in top_k_masks(scores, budget).items():
            if mask.any():
                chosen[name] = torch.nonzero(mask.reshape(-1)).flatten()

    def inject(self, site, config: ShPeftConfig, context: InjectContext) -> list[nn.Parameter]:
        chosen: dict[str, torch.Tensor] = context.scratch.get("shpeft", {})
        params: list[nn.Parameter] = []
        for module in list(site.module.modules()):
            for attr, p in list(module.named_parameters(recurse=False)):
                name = context.param_names.get(id(p))
                if name is None or name not in chosen:
                    continue
                index = chosen[name]
                if index.numel() and (int(index.min()) < 0 or int(index.max()) >= p.numel()):
                    raise PlanError(f"SH-PEFT selection for {name!r} points outside its {p.numel()} entries.")
                delta = SparseDelta(index, p)
                parametrize.register_parametrization(module, attr, delta)
                params.append(delta.values)
        return params

    def merge(self, module: nn.Module) -> None:
        for owner in list(module.modules()):
            if not parametrize.is_parametrized(owner):
                continue
            for attr in list(owner.parametrizations.keys()):
                if any(isinstance(p, SparseDelta) for p in owner.parametrizations[attr]):
                    parametrize.remove_parametrizations(owner, attr, leave_parametrized=True)
