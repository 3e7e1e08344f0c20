"""Arguments and helpers shared by several subcommands."""

from __future__ import annotations

import argparse

from autopeft.data.manifest import resolve_manifest  # noqa: F401  (re-exported for the commands)
from autopeft.tables import print_table  # noqa: F401  (re-exported for the commands)


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        metavar="DIR_OR_CSV",
        default=None,
        help="a directory holding manifest.csv, or the manifest itself (columns subject,scanner,"
        "short,long). Default: the built-in simulated five-scanner data, made on first use.",
    )


def add_weights_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights",
        metavar="FILE_OR_DIR",
        default=None,
        help="start from your own pre-trained model instead of pre-training: a .safetensors file, a PyTorch "
        "state dict (.pt, read with torch.load(weights_only=True); other pickled objects are refused) or a "
        "MONAI bundle folder (models/model.safetensors or models/model.pt). It must fit --backbone and "
        "--preset (whole backbone, or its network alone); it is cached by content hash.",
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", required=True, help="registered backbone (see 'autopeft backbones')")
    parser.add_argument("--preset", default="tiny", help="backbone preset: tiny (CPU) or paper (GPU)")
    parser.add_argument("--fold", type=int, default=0, help="cross-validation fold of the subject splits")
    parser.add_argument("--seed", type=int, default=0, help="seeds initialisation, splits and crops")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")


def resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from autopeft.errors import ConfigError

        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu.")
    return device
