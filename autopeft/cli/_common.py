"""Arguments and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
from typing import Any, Protocol

from autopeft.data.builtin import resolve_manifest  # noqa: F401  (re-exported for the commands)
from autopeft.tables import print_table  # noqa: F401  (re-exported for the commands)


class ArgumentGroup(Protocol):
    """What a command adds flags to: its parser or one of the parser's argument groups (typed by what
    both offer, argparse's group class being private)."""

    def add_argument(self, *name_or_flags: str, **kwargs: Any) -> argparse.Action: ...


def add_data_argument(parser: ArgumentGroup) -> None:
    parser.add_argument(
        "--data",
        metavar="DIR_OR_CSV",
        default=None,
        help="a directory holding manifest.csv, or the manifest itself (columns subject,scanner,"
        "short,long). Default: the built-in simulated five-scanner data, made on first use.",
    )


def add_weights_argument(parser: ArgumentGroup) -> None:
    parser.add_argument(
        "--weights",
        metavar="FILE_OR_DIR",
        default=None,
        help="start from your own pre-trained model instead of pre-training: a .safetensors file, a PyTorch "
        "state dict (.pt, read with torch.load(weights_only=True); other pickled objects are refused) or a "
        "MONAI bundle folder (models/model.safetensors or models/model.pt). It must fit --backbone and "
        "--preset (whole backbone, or its network alone); it is cached by content hash.",
    )


def add_amp_argument(parser: ArgumentGroup, *, what: str, from_run: bool = False) -> None:
    """``--amp``: mixed precision (``autopeft.precision``) in ``what`` the command trains or scores.

    Args:
        parser: the command's parser or argument group.
        what: the command's work that runs in mixed precision, for the help.
        from_run: ``--amp/--no-amp`` with None as the default, for a command that otherwise takes the
            setting from a search's run.json. Defaults to False (``--amp``, default off).
    """
    default = "the search's setting for a plan from its run, else off" if from_run else "off"
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction if from_run else "store_true",
        default=None if from_run else False,
        help=f"automatic mixed precision (torch.autocast) in {what}: bfloat16 where the device has it, else float16 "
        "with loss scaling; faster and leaner on GPUs, while bfloat16 on most CPUs is slower than float32. Source "
        f"models pre-trained with it are cached apart from full-precision ones (default: {default})",
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


NETWORK_HELP = """your own network (--backbone monai:NAME | bundle:DIR | module.path:Class):
  monai:NAME          any class of monai.networks.nets, built with --net-args (e.g. monai:BasicUNet)
  bundle:DIR          a MONAI bundle folder: its network_def (configs/inference.json) through MONAI's
                      ConfigParser; crop and channels from its metadata where given; its weights with
                      --weights DIR --source SCANNER
  module.path:Class   a torch.nn.Module class of a module installed where autopeft runs
A bundle's network_def and a module:Class run code you named, as MONAI bundles do; nothing else in
a file you hand in is imported or run (--net-args and --sites-override are read as data,
yaml.safe_load; weights without unpickling). The network must map 1 x 1 x D x H x W to
1 x 1 x D x H x W at the crop size (or --in-channels / --out-channels); where its constructor takes
them and --net-args do not give them, spatial_dims=3, in_channels, out_channels and img_size (the
crop) are filled in. Its sites are found from one traced forward pass ('autopeft backbones --sites
--backbone ...' prints them)."""


def add_network_arguments(parser: argparse.ArgumentParser, *, schedule: bool = True) -> None:
    """Flags of a network given by reference (``--backbone monai:NAME`` and the others)."""
    group = parser.add_argument_group("your own network", NETWORK_HELP)
    group.add_argument("--net-args", metavar="JSON_OR_FILE", default=None,
                       help="constructor arguments: a JSON object, or a JSON/YAML file holding one "
                       "(e.g. '{\"features\": [8, 8, 16, 16, 32, 8]}')")
    group.add_argument("--sites-override", metavar="FILE", default=None,
                       help="YAML that corrects the found sites: exclude: [names], merge: {new: [names]}, "
                       "rename: {old: new}, roles/kinds/stages: {name: value}")
    group.add_argument("--crop", metavar="D,H,W", default=None,
                       help="training crop and sliding window (default: a bundle's input shape, else 32,32,32)")
    group.add_argument("--batch-size", type=int, default=None, metavar="N", help="training batch (default: 2)")
    group.add_argument("--in-channels", type=int, default=None, metavar="N", help="input channels (default: 1)")
    group.add_argument("--out-channels", type=int, default=None, metavar="N", help="output channels (default: 1)")
    if schedule:
        group.add_argument("--lr-peft", type=float, default=None, help="fine-tuning learning rate of PEFT plans without their own (default: 2e-3)")
        group.add_argument("--lr-full", type=float, default=None, help="fine-tuning learning rate of Full-FT (default: 5e-4)")
        group.add_argument("--finetune-epochs", type=int, default=None, help="fine-tuning epochs where none are given (default: 20)")
        group.add_argument("--pretrain-lr", type=float, default=None, help="pre-training learning rate on the built-in data (default: 2e-3)")


def _crop(text: str | None) -> tuple[int, ...] | None:
    from autopeft.errors import ConfigError

    if text is None:
        return None
    try:
        sides = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        sides = ()
    if len(sides) == 1:
        sides = sides * 3
    if len(sides) != 3 or min(sides) < 1:
        raise ConfigError(f"--crop must be D,H,W (or one side for a cube), e.g. --crop 32,32,32, but got {text!r}.")
    return sides


def _require_one_channel(in_channels: int, out_channels: int) -> None:
    # The data pipeline reads one scan per side (short scan in, full scan out, one channel each), so a
    # network with other channel counts is refused here rather than failing inside the first batch.
    from autopeft.errors import ConfigError

    if (in_channels, out_channels) != (1, 1):
        raise ConfigError(
            f"the network takes {in_channels} input and gives {out_channels} output channel(s) (from --in-channels/"
            "--out-channels, or a bundle's metadata), but training and scoring read one channel per scan (the short scan "
            "in, the full-time scan out): this command needs 1 and 1. Channel counts other than 1 are for inspecting a "
            "network (autopeft backbones --sites, autopeft space); to train, build it with in_channels=1, "
            "out_channels=1 (e.g. --net-args '{\"in_channels\": 1, \"out_channels\": 1}' and no --in-channels).")


def resolve_backbone(args: argparse.Namespace, *, check: bool = True, quiet: bool = False,
                     on_data: bool = False) -> tuple[str, str | None]:
    """``(backbone, preset)`` from ``--backbone`` (and ``--preset``): a registered backbone as given;
    a network by reference registered (in this process and for the ones it starts) with its
    configuration from the network flags, checked to be image-to-image, its settings printed.
    ``on_data``: the command trains or scores the network on scans, which have one channel each.

    Raises:
        ConfigError: a bad reference, --net-args, --crop or override file, or a network that is not
            image-to-image (naming the shapes); network flags with a registered backbone; with
            ``on_data``, a network with more than one input or output channel.
    """
    from autopeft.errors import ConfigError
    from autopeft.backbones.network import is_network_spec

    given = {flag: getattr(args, attr, None) for flag, attr in (
        ("--net-args", "net_args"), ("--sites-override", "sites_override"), ("--crop", "crop"), ("--batch-size", "batch_size"),
        ("--in-channels", "in_channels"), ("--out-channels", "out_channels"), ("--lr-peft", "lr_peft"), ("--lr-full", "lr_full"),
        ("--finetune-epochs", "finetune_epochs"), ("--pretrain-lr", "pretrain_lr"))}
    if not args.backbone or not is_network_spec(args.backbone):
        used = [flag for flag, value in given.items() if value is not None]
        if used:
            raise ConfigError(f"{', '.join(used)}: for a network given by reference (--backbone monai:NAME, bundle:DIR or "
                              f"module.path:Class); backbone {args.backbone!r} has presets instead (--preset).")
        return args.backbone, getattr(args, "preset", None)
    if getattr(args, "preset", None) not in (None, "tiny"):
        raise ConfigError(f"--preset {args.preset}: a network by reference has no presets; set --crop, --batch-size and "
                          "the schedule flags instead.")
    import yaml

    from autopeft.backbones import build_backbone
    from autopeft.backbones.network import network_ref, parse_net_args, register_network

    override = None
    if given["--sites-override"] is not None:
        from pathlib import Path

        path = Path(given["--sites-override"]).expanduser()
        try:
            override = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"--sites-override {path}: cannot be read as YAML ({err}).") from err
        if not isinstance(override, dict):
            raise ConfigError(f"--sites-override {path}: must be a mapping (exclude, merge, rename, roles, kinds, stages).")
    finetune = {k: v for k, v in (("lr_peft", given["--lr-peft"]), ("lr_full", given["--lr-full"]),
                                  ("epochs", given["--finetune-epochs"])) if v is not None}
    pretrain = {"lr": given["--pretrain-lr"]} if given["--pretrain-lr"] is not None else {}
    ref = network_ref(args.backbone, net_args=parse_net_args(given["--net-args"]), in_channels=given["--in-channels"],
                      out_channels=given["--out-channels"], crop=_crop(given["--crop"]), batch_size=given["--batch-size"],
                      finetune=finetune, pretrain=pretrain, sites_override=override)
    if on_data:
        _require_one_channel(ref.in_channels, ref.out_channels)
    name, preset = register_network(ref)
    model = build_backbone(name, preset)
    if check:
        model.check_image_to_image()
        model.sites()  # the trace, and the override's errors, now
    if not quiet:
        p = model.preset
        args_text = " (network_def of the bundle)" if ref.bundle_config is not None else f" {ref.constructor_args()}"
        print(f"network: {ref.spec}{args_text}\n  configuration {preset}: crop {'x'.join(map(str, p.crop_size))}, batch "
              f"{p.batch_size}, {ref.in_channels} -> {ref.out_channels} channels; fine-tuning {p.finetune.epochs} epochs, "
              f"lr {p.finetune.lr_peft:g} (PEFT) / {p.finetune.lr_full:g} (Full-FT); pre-training on the built-in data "
              f"(without --weights) {p.pretrain.epochs} epochs, lr {p.pretrain.lr:g}", flush=True)
    return name, preset
