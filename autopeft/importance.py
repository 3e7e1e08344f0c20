"""SH-PEFT's hybrid weight importance, per weight and per site.

From the SH-PEFT paper (Liu et al., "Sparsity- and Hybridity-Inspired Visual Parameter-Efficient
Fine-Tuning for Medical Diagnosis", Sec. 2.2): the importance of weight ``w`` is

    I = I_task + lambda * s * I_agnostic,   s = sum(I_task) / sum(I_agnostic)

where the sums run over every scored weight of the model (the paper's "before applying lambda,
the second term is weighted by sum I^td / sum I^ta", said of both variants), and

- ``variant="l1"``: ``I_task = |sum_b dE_b/dw|`` (gradients accumulated over the batches, the
  paper's "trend of weight changes", in absolute value because the importance is ``|delta E|``),
  ``I_agnostic = |w|``;
- ``variant="l2"``: ``I_task = sum_b (dE_b/dw)^2`` (first-order Taylor estimate with the weight
  change approximated by the gradient), ``I_agnostic = w^2``.

The paper uses L2 with lambda = 1 and about one epoch of batches. The selected weights are those
above the threshold that leaves exactly the budgeted count
(:func:`autopeft.peft.shpeft.top_k_masks`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from autopeft._io import atomic_write
from autopeft.data import train_loader

__all__ = [
    "compute_importance",
    "importance_at",
    "importance_on_scans",
    "importance_pair_on_scans",
    "site_importance",
    "training_crops",
    "reconstruction_l1",
]

_VARIANTS = ("l1", "l2")
_REDUCTIONS = ("mean", "sum")


def _scored_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    # A backbone is scored on its fine-tuned network only: the discriminator is never tuned.
    net = getattr(model, "net", None)
    named = list(model.named_parameters())
    if isinstance(net, nn.Module):
        wanted = {id(p) for p in net.parameters()}
        named = [(n, p) for n, p in named if id(p) in wanted]
    return [(n, p) for n, p in named if p.is_floating_point()]


def compute_importance(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    variant: str = "l2",
    lam: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Hybrid importance of every weight of ``model`` (of ``model.net`` for a backbone).

    Gradients are taken batch by batch without changing any weight; the model's train/eval mode
    is left as the caller set it, and each parameter's ``requires_grad`` is restored afterwards.

    Args:
        model: the pre-trained model (a ``Backbone`` or any module).
        batches: the batches to accumulate over (e.g. one epoch of the target's training data).
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` (e.g. L1 between ``model(x)`` and ``y``).
        variant: ``"l1"`` or ``"l2"`` (module docstring). Defaults to ``"l2"``.
        lam: weight lambda of the task-agnostic term after rescaling. Defaults to 1.0.

    Returns:
        Parameter name (as in ``model.named_parameters()``) -> importance, same shape as the
        parameter, float32 on the parameter's device.

    >>> net = nn.Linear(3, 2)
    >>> batches = [(torch.randn(4, 3), torch.randn(4, 2))]
    >>> scores = compute_importance(net, batches, lambda m, b: (m(b[0]) - b[1]).abs().mean())
    >>> sorted(scores), scores["weight"].shape
    (['bias', 'weight'], torch.Size([2, 3]))
    """
    if variant not in _VARIANTS:
        raise ValueError(f"`variant` must be one of {_VARIANTS}, but got {variant!r}.")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
        raise ValueError(f"`lam` must be a non-negative number, but got {lam!r}.")
    named = _scored_parameters(model)
    if not named:
        raise ValueError("`model` must have floating-point parameters to score, but has none.")
    saved_flags = {id(p): p.requires_grad for p in model.parameters()}
    accumulated = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in named}
    seen_batches = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for _, p in named:
            p.requires_grad_(True)
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
                raise ValueError(f"`loss_fn` must return a scalar tensor, but got {type(loss).__name__} {getattr(loss, 'shape', '')}.")
            loss.backward()
            for name, p in named:
                if p.grad is not None:
                    grad = p.grad.detach().float()
                    accumulated[name] += grad if variant == "l1" else grad.square()
            seen_batches += 1
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(saved_flags[id(p)])
    if seen_batches == 0:
        raise ValueError("`batches` must yield at least one batch, but yielded none.")

    task = {n: (a.abs() if variant == "l1" else a) for n, a in accumulated.items()}
    agnostic = {n: (p.detach().float().abs() if variant == "l1" else p.detach().float().square()) for n, p in named}
    task_total = sum(float(t.sum()) for t in task.values())
    agnostic_total = sum(float(a.sum()) for a in agnostic.values())
    balance = task_total / agnostic_total if agnostic_total > 0 else 0.0
    return {n: task[n] + (lam * balance) * agnostic[n] for n in task}


def site_importance(model: nn.Module, scores: Mapping[str, torch.Tensor], *, reduce: str = "mean") -> dict[str, float]:
    """Aggregate per-weight importance into one number per site of a backbone.

    ``mean`` (default): average importance of the site's weights (comparable across sites of
    different size: "how important is a typical weight here"); ``sum``: total importance (grows
    with size: "how much of the network's importance lives here"). Weights without a score (e.g.
    added by PEFT after scoring) are ignored; a site with no scored weight gets 0.0.

    Args:
        model: the backbone the scores were computed on (has ``sites()``).
        scores: output of :func:`compute_importance` on ``model``.
        reduce: ``"mean"`` or ``"sum"``. Defaults to ``"mean"``.

    Returns:
        site name -> aggregated importance, in ``model.sites()`` order.
    """
    if reduce not in _REDUCTIONS:
        raise ValueError(f"`reduce` must be one of {_REDUCTIONS}, but got {reduce!r}.")
    name_of = {id(p): n for n, p in model.named_parameters()}
    result: dict[str, float] = {}
    for site in model.sites():
        total, count = 0.0, 0
        for p in site.module.parameters():
            name = name_of.get(id(p))
            if name is not None and name in scores:
                total += float(scores[name].sum())
                count += scores[name].numel()
        result[site.name] = (total / count if count else 0.0) if reduce == "mean" else total
    return result


def importance_pair_on_scans(
    model: nn.Module,
    records: list[Mapping[str, Any]],
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    cache_file: str | os.PathLike | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Importance at lambda 0 and 1 (L2 variant) on one epoch of crops from ``records``, cached.

    I(lambda) = I_task + lambda * s * I_agnostic is linear in lambda, so these two maps give every
    lambda: ``I_0 + lambda * (I_1 - I_0)`` (:func:`importance_at`). The model is scored in eval
    mode (normalisation layers use their pre-trained statistics, as at inference).

    Args:
        model: a ``Backbone`` (pre-trained source model), moved to ``device`` and switched to
            eval mode (pass a copy to keep yours as it is); its weights are not changed.
        records: scan pairs (the target's fine-tuning ``train`` split).
        seed: seeds the crops. Defaults to 0.
        device: where gradients are taken. Defaults to ``cpu``.
        cache_file: a safetensors file that holds (or will hold) both maps. Defaults to no cache.

    Returns:
        ``(I at lambda 0, I at lambda 1)``, on the CPU.
    """
    path = Path(cache_file) if cache_file is not None else None
    if path is not None and path.is_file():
        tensors = load_file(str(path))
        return ({k[len("task."):]: v for k, v in tensors.items() if k.startswith("task.")},
                {k[len("hybrid."):]: v for k, v in tensors.items() if k.startswith("hybrid.")})
    device = torch.device(device)
    model.to(device).eval()
    batches = list(training_crops(model, records, seed=seed, device=device))  # the same crops for both maps
    task = {k: v.cpu() for k, v in compute_importance(model, batches, reconstruction_l1, variant="l2", lam=0.0).items()}
    hybrid = {k: v.cpu() for k, v in compute_importance(model, batches, reconstruction_l1, variant="l2", lam=1.0).items()}
    if path is not None:
        tensors = {**{f"task.{k}": v.contiguous() for k, v in task.items()}, **{f"hybrid.{k}": v.contiguous() for k, v in hybrid.items()}}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))  # two processes writing one map leave one whole file
    return task, hybrid


def importance_at(task: Mapping[str, torch.Tensor], hybrid: Mapping[str, torch.Tensor], lam: float) -> dict[str, torch.Tensor]:
    """I(lambda) from the maps at lambda 0 and 1 (:func:`importance_pair_on_scans`)."""
    return {n: task[n] + lam * (hybrid[n] - task[n]) for n in task}


def importance_on_scans(
    model: nn.Module,
    records: list[Mapping[str, Any]],
    *,
    variant: str = "l2",
    lam: float = 1.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Hybrid importance of a backbone's weights on one epoch of crops from ``records``.

    The loss is L1 between ``model(short)`` and ``long`` for every backbone: it scores a weight by
    its effect on reconstructing the target scans (an adversarial term would score the frozen
    discriminator's opinion instead). One epoch of the preset's crops, as the paper uses.

    Args:
        model: a ``Backbone`` (pre-trained source model).
        records: scan pairs (e.g. the target's fine-tuning ``train`` split).
        variant: ``"l1"`` or ``"l2"``. Defaults to ``"l2"``.
        lam: lambda of the task-agnostic term. Defaults to 1.0.
        seed: seeds the crops. Defaults to 0.
        device: where gradients are taken. Defaults to ``cpu``.
    """
    device = torch.device(device)
    model.to(device)
    return compute_importance(model, training_crops(model, records, seed=seed, device=device), reconstruction_l1, variant=variant, lam=lam)


def training_crops(model: nn.Module, records: list[Mapping[str, Any]], *, seed: int, device: torch.device):
    """One epoch of the preset's training crops from ``records``, on ``device``."""
    loader = train_loader(records, crop_size=model.preset.crop_size, batch_size=model.preset.batch_size, seed=seed)
    for batch in loader:
        yield {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def reconstruction_l1(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The loss importance is measured with: L1 between the model's output and the long scan."""
    # L1 for every backbone: a weight's effect on reconstructing the target scans (an adversarial
    # term would score the frozen discriminator's opinion instead).
    return F.l1_loss(model(batch["short"]), batch["long"])
