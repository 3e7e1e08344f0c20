"""Backbone registry: image-to-image networks with named PEFT sites.

>>> from autopeft.backbones import build_backbone
>>> model = build_backbone("unetr", "tiny")
>>> [s.name for s in model.sites()][:2]  # doctest: +SKIP
"""

from autopeft.backbones.base import (
    Backbone,
    FinetuneSchedule,
    Preset,
    PretrainSchedule,
    Site,
    build_backbone,
    register_backbone,
    registered_backbones,
)

__all__ = [
    "Backbone", "FinetuneSchedule", "PretrainSchedule", "Preset", "Site", "build_backbone", "register_backbone",
    "registered_backbones",
]
