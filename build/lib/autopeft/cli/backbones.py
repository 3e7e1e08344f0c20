"""List the registered backbones, their presets and sizes, and where PEFT can go in them.

A backbone is a 3D image-to-image network (short scan in, long-scan estimate out) with named
*sites*: the blocks where a PEFT method can be placed. Each site has
  role   encoder, bottleneck or decoder (Mix-PEFT picks one method per role),
  kind   vit (a transformer block, with attention) or cnn (a convolutional block),
  stage  its resolution level, 0 = full resolution, k = 1/2^k scale.
Plans address sites by name or by glob pattern ("encoder.*", "decoder.stage3.*").

A preset fixes a backbone's sizes: "tiny" runs on a laptop CPU (32^3 crops), "paper" is PETITE's
configuration (64^3 crops, meant for a GPU). Parameter counts are exact; they are taken from
networks built on PyTorch's meta device, which allocates nothing, so even the paper presets are
counted in a moment. "disc" is the discriminator of adversarial backbones (frozen during PEFT,
not counted in trainable fractions); "in sites" is the share of the network's parameters that
lies inside some site (the rest: embeddings, final norms, output layers).

examples:
  autopeft backbones                                  # every backbone and preset, with sizes
  autopeft backbones --sites                          # ... and the sites of each
  autopeft backbones --backbone cvtgan --preset paper # the sites of one configuration
  autopeft backbones --json > backbones.json          # everything, machine-readable
  autopeft backbones --sites --backbone monai:SwinUNETR --crop 64 \
      --net-args '{"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 4}'
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from autopeft.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from autopeft.backbones import Backbone


def configure(parser: argparse.ArgumentParser) -> None:
    from autopeft.cli._common import add_network_arguments

    parser.add_argument("--backbone", metavar="NAME", help="only this backbone (implies --sites); or your own network: "
                        "monai:NAME, bundle:DIR, module.path:Class (see below)")
    parser.add_argument("--preset", metavar="NAME", help="only this preset (e.g. tiny, paper)")
    parser.add_argument("--sites", action="store_true", help="also list every site with its parameter count")
    parser.add_argument("--json", action="store_true", help="print JSON (sites always included) instead of tables")
    add_network_arguments(parser, schedule=False)


def run(args: argparse.Namespace) -> int:
    from autopeft.backbones.network import is_network_spec

    if args.backbone and is_network_spec(args.backbone):
        from autopeft.cli._common import resolve_backbone
        from autopeft.backbones import build_backbone

        name, preset = resolve_backbone(args, quiet=args.json)
        reports = [_report(build_backbone(name, preset), name, preset)]
    else:
        from autopeft.cli._common import resolve_backbone

        resolve_backbone(args)  # refuses network flags without a network
        reports = describe(backbone=args.backbone, preset=args.preset)
    if args.json:
        json.dump(reports, sys.stdout, indent=2)
        print()
        return 0
    print(_summary_table(reports))
    if args.sites or args.backbone:
        for report in reports:
            print()
            print(f"{report['backbone']} / {report['preset']}: {len(report['sites'])} sites")
            print(_sites_table(report))
    return 0


def describe(backbone: str | None = None, preset: str | None = None) -> list[dict[str, Any]]:
    """Sizes and sites of registered backbones, one dict per (backbone, preset).

    Args:
        backbone: only this backbone. Defaults to all registered ones.
        preset: only this preset. Defaults to every preset of each backbone.

    Raises:
        ConfigError: for an unknown backbone, or a preset that the chosen backbones lack.
    """
    from autopeft.backbones import registered_backbones
    from autopeft.backbones.network import is_network_spec

    # Networks by reference are described with --backbone SPEC and their flags, not listed.
    registry = {name: presets for name, presets in registered_backbones().items() if not is_network_spec(name)}
    if backbone is not None and backbone not in registry:
        raise ConfigError(f"Unknown backbone {backbone!r}; registered: {', '.join(sorted(registry))}.")
    names = [backbone] if backbone is not None else list(registry)
    reports = []
    for name in names:
        presets = registry[name]
        if preset is not None and preset not in presets:
            if backbone is not None:
                raise ConfigError(f"Backbone {name!r} has no preset {preset!r}; presets: {', '.join(presets)}.")
            continue
        for preset_name in [preset] if preset is not None else list(presets):
            reports.append(_describe_one(name, preset_name))
    if not reports:
        known = sorted({p for presets in registry.values() for p in presets})
        raise ConfigError(f"No backbone has a preset {preset!r}; presets: {', '.join(known)}.")
    return reports


def _describe_one(name: str, preset_name: str) -> dict[str, Any]:
    return _report(_build_for_counting(name, preset_name), name, preset_name)


def _report(model: Backbone, name: str, preset_name: str) -> dict[str, Any]:
    net_parameters = _count(model.net)
    sites = [
        {"name": s.name, "role": s.role, "kind": s.kind, "stage": s.stage, "parameters": _count(s.module)}
        for s in model.sites()
    ]
    return {
        "backbone": name,
        "preset": preset_name,
        "crop_size": list(model.preset.crop_size),
        "batch_size": model.preset.batch_size,
        "loss": model.loss,
        "net_parameters": net_parameters,
        "discriminator_parameters": _count(model.discriminator) if model.discriminator is not None else 0,
        "site_parameters": sum(site["parameters"] for site in sites),
        "sites": sites,
    }


def _build_for_counting(name: str, preset_name: str) -> Backbone:
    import torch

    from autopeft.backbones import build_backbone

    # Meta tensors have shapes but no storage: a 100 M-parameter UNETR "builds" in milliseconds.
    try:
        with torch.device("meta"):
            return build_backbone(name, preset_name)
    except (NotImplementedError, RuntimeError):
        # A plug-in backbone whose constructor touches tensor data cannot be built on meta.
        return build_backbone(name, preset_name)


def _count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _summary_table(reports: list[dict[str, Any]]) -> str:
    rows = [
        [
            r["backbone"],
            r["preset"],
            "x".join(map(str, r["crop_size"])),
            str(r["batch_size"]),
            r["loss"],
            f"{r['net_parameters']:,}",
            f"{r['discriminator_parameters']:,}" if r["discriminator_parameters"] else "-",
            str(len(r["sites"])),
            f"{100 * r['site_parameters'] / max(r['net_parameters'], 1):.1f}%",
        ]
        for r in reports
    ]
    headers = ["backbone", "preset", "crop", "batch", "loss", "net params", "disc params", "sites", "in sites"]
    return _table(headers, rows, right_aligned={3, 5, 6, 7, 8})


def _sites_table(report: dict[str, Any]) -> str:
    total = max(report["net_parameters"], 1)
    rows = [
        [
            s["name"],
            s["role"],
            s["kind"],
            str(s["stage"]),
            f"{s['parameters']:,}",
            f"{100 * s['parameters'] / total:.2f}%",
        ]
        for s in report["sites"]
    ]
    return _table(["site", "role", "kind", "stage", "params", "of net"], rows, right_aligned={3, 4, 5})


def _table(headers: list[str], rows: list[list[str]], right_aligned: set[int]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.rjust(width) if i in right_aligned else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])
