"""Reusable network parts, kept apart from the assembled backbones (MONAI's blocks/nets split)."""

from autopeft.backbones.blocks.cvt import (
    ConvEmbedding,
    ConvProjectionAttention,
    CvTBlock,
    CvTStage,
    TransposedConvEmbedding,
)

__all__ = [
    "ConvEmbedding",
    "ConvProjectionAttention",
    "CvTBlock",
    "CvTStage",
    "TransposedConvEmbedding",
]
