"""autopeft: search for parameter-efficient fine-tuning plans of 3D image-to-image networks.

The public surface is kept small; everything else lives in private or submodules.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
