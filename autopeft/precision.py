"""Mixed precision (``--amp``): the dtype a model computes in, through PyTorch's ``torch.autocast``.

``fp32`` is full precision. ``bf16`` and ``fp16`` run convolutions and matrix products in that
dtype under autocast, which keeps reductions and losses in float32. bfloat16 has float32's range,
so it needs no loss scaling; float16 does (``torch.amp.GradScaler``, in ``autopeft.train``) and is
for CUDA GPUs only. ``--amp`` asks for mixed precision; :func:`amp_precision` picks the dtype the
device does best.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from autopeft.errors import ConfigError

__all__ = ["Precision", "PRECISIONS", "amp_precision", "autocast", "check_precision"]

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_precision(amp: bool, device: torch.device | str) -> Precision:
    """The precision ``--amp`` (``amp``) means on ``device``: ``fp32`` when off; else ``bf16`` on a
    CPU and on GPUs with bfloat16 arithmetic (NVIDIA Ampere and later), ``fp16`` on older GPUs.

    Args:
        amp: whether mixed precision is asked for.
        device: where the model runs.
    """
    if not amp:
        return "fp32"
    if torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return "fp16"
    return "bf16"


def check_precision(precision: str, device: torch.device | str | None = None) -> None:
    """Refuse a precision that is unknown, or ``fp16`` on a CPU.

    Args:
        precision: ``fp32``, ``bf16`` or ``fp16``.
        device: where the model runs; None checks the name only. Defaults to None.

    Raises:
        ConfigError: naming the precision and what to use instead.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"`precision` must be one of {', '.join(PRECISIONS)}, but got {precision!r}.")
    if precision == "fp16" and device is not None and torch.device(device).type == "cpu":
        # Refused although torch's CPU autocast accepts float16: it needs loss scaling and most CPUs
        # have no float16 arithmetic, so it is slower than float32 there for no gain over bfloat16.
        raise ConfigError("`precision` 'fp16' is for CUDA GPUs, not a CPU: use 'bf16' (what --amp picks on a CPU) "
                          "or 'fp32'.")


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` at ``precision`` on ``device``'s type; it does nothing at ``fp32``.

    Args:
        precision: ``fp32``, ``bf16`` or ``fp16``.
        device: where the model runs.

    Raises:
        ConfigError: as :func:`check_precision`.
    """
    check_precision(precision, device)
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES.get(precision),
                          enabled=precision != "fp32")
