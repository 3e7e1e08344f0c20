"""Find the layers a method targets inside a site, by the role of each layer.

Plans name roles, not attribute paths, so that one plan fits UNETR (MONAI's ``TransformerBlock``:
fused ``attn.qkv``, ``attn.out_proj``, ``mlp.linear1``/``linear2``) and CVT-GAN (``attn.proj_q``/
``proj_k``/``proj_v`` after depthwise convs, ``attn.out_proj``, the same MLP) alike. A role is
recognised by the layer's attribute name (the last part of its dotted name) and its type:

==========  =====================================================================================
role        layers
==========  =====================================================================================
q, k, v     ``Linear`` named ``q``/``to_q``/``proj_q``/``q_proj``/``query`` (likewise k, v); or
            the matching third of a fused ``qkv`` ``Linear`` (``hidden -> 3*hidden``)
qkv         q, k and v together
out_proj    attention output ``Linear``: ``out_proj``/``proj``/``proj_out``/``o_proj``
mlp         every ``Linear`` inside a module named ``mlp``/``ffn``/``feed_forward``
mlp_out     the last ``Linear`` of each such MLP (where the block's FFN output leaves)
conv        every ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d`` (depthwise/grouped included)
norm        every ``LayerNorm`` (over one dim), ``BatchNorm``, ``InstanceNorm``, ``GroupNorm``
linear      every ``Linear``
==========  =====================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from autopeft.errors import PlanError

__all__ = ["TARGET_ROLES", "Target", "find_targets", "find_mlp_modules", "available_roles", "site_targets", "CONV_TYPES",
           "PLAIN_CONV_TYPES", "CONV_TRANSPOSE_TYPES", "NORM_TYPES", "CHANNEL_NORM_TYPES"]

_QKV_ALIASES: dict[str, tuple[str, ...]] = {
    "q": ("q", "to_q", "proj_q", "q_proj", "query"),
    "k": ("k", "to_k", "proj_k", "k_proj", "key"),
    "v": ("v", "to_v", "proj_v", "v_proj", "value"),
}
_FUSED_QKV_NAMES = ("qkv", "to_qkv", "qkv_proj")
_OUT_PROJ_NAMES = ("out_proj", "proj", "proj_out", "o_proj")
_MLP_NAMES = ("mlp", "ffn", "feed_forward")

# The layer types methods tell apart, defined once for all of them.
PLAIN_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONV_TYPES: tuple[type[nn.Module], ...] = PLAIN_CONV_TYPES + CONV_TRANSPOSE_TYPES
# Norms over the channel dimension (BatchNorm, InstanceNorm, GroupNorm), and all norms.
CHANNEL_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm)
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm,) + CHANNEL_NORM_TYPES

TARGET_ROLES: tuple[str, ...] = ("q", "k", "v", "qkv", "out_proj", "mlp", "mlp_out", "conv", "norm", "linear")


@dataclass(frozen=True)
class Target:
    """One layer a method will change.

    Args:
        name: dotted name inside the site module ("" for the site module itself).
        layer: the layer.
        parts: for a fused ``qkv`` Linear, which thirds are targeted (subset of ``q``, ``k``, ``v``
            in that order); ``None`` for a whole layer.
    """

    name: str
    layer: nn.Module
    parts: tuple[str, ...] | None = None


def _leaf(name: str) -> str:
    return name.rpartition(".")[2]


def _is_peft_internal(name: str) -> bool:
    # Layers a method already added (LoRA factors, adapters, ...) are never targets themselves.
    return any(part.startswith(("lora_", "peft_")) or part == "base_layer" for part in name.split("."))


def _plain_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    # The site module itself (name "") is included: a site may be a single layer (CVT-GAN's
    # ``decoder.up1`` is one ConvTranspose3d).
    return [(n, m) for n, m in module.named_modules() if not _is_peft_internal(n)]


def find_mlp_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The feed-forward modules (named ``mlp``/``ffn``/``feed_forward``) inside ``module``."""
    return [(n, m) for n, m in _plain_layers(module) if n and _leaf(n) in _MLP_NAMES]


def _is_norm(layer: nn.Module) -> bool:
    if isinstance(layer, nn.LayerNorm):
        # Only a LayerNorm over the channel dimension alone has one scale per channel.
        return len(layer.normalized_shape) == 1
    return isinstance(layer, NORM_TYPES)


def find_targets(module: nn.Module, roles: tuple[str, ...]) -> list[Target]:
    """The layers inside ``module`` that play any of ``roles``, in module order, without repeats.

    A fused ``qkv`` Linear targeted through several of ``q``/``k``/``v`` appears once with all
    of its targeted parts.

    Args:
        module: a site's module.
        roles: names from :data:`TARGET_ROLES`.
    """
    unknown = [r for r in roles if r not in TARGET_ROLES]
    if unknown:
        raise ValueError(f"`targets` must be among {TARGET_ROLES}, but got {unknown}.")
    wanted = set(roles)
    if "qkv" in wanted:
        wanted |= {"q", "k", "v"}
    layers = _plain_layers(module)
    mlp_linears: dict[str, bool] = {}  # name -> is the last Linear of its MLP
    for mlp_name, mlp in find_mlp_modules(module):
        linears = [n for n, m in mlp.named_modules() if isinstance(m, nn.Linear) and not _is_peft_internal(n)]
        for index, name in enumerate(linears):
            mlp_linears[f"{mlp_name}.{name}"] = index == len(linears) - 1

    found: list[Target] = []
    for name, layer in layers:
        leaf = _leaf(name)
        if isinstance(layer, nn.Linear):
            if leaf in _FUSED_QKV_NAMES and layer.out_features % 3 == 0:
                parts = tuple(p for p in ("q", "k", "v") if p in wanted)
                if parts or "linear" in wanted:
                    found.append(Target(name, layer, parts or ("q", "k", "v")))
                continue
            separate = [role for role, aliases in _QKV_ALIASES.items() if leaf in aliases]
            if (
                (separate and separate[0] in wanted)
                or ("out_proj" in wanted and leaf in _OUT_PROJ_NAMES)
                or ("mlp" in wanted and name in mlp_linears)
                or ("mlp_out" in wanted and mlp_linears.get(name, False))
                or "linear" in wanted
            ):
                found.append(Target(name, layer))
        elif isinstance(layer, CONV_TYPES):
            if "conv" in wanted:
                found.append(Target(name, layer))
        elif "norm" in wanted and _is_norm(layer):
            found.append(Target(name, layer))
    return found


def site_targets(site, roles: tuple[str, ...], context, what: str) -> list[Target]:
    """:func:`find_targets` in ``site.module``, without layers the network never uses (``context``:
    the :class:`~autopeft.peft.base.InjectContext`), for a method that wraps each of them.

    Raises:
        PlanError: no layer plays any of ``roles``, listing the roles the site offers.
    """
    targets = [t for t in find_targets(site.module, roles) if not context.is_unused(t.layer)]
    if not targets:
        raise PlanError(
            f"{what} targets {list(roles)} match no layer in site {site.name!r} ({site.kind}); "
            f"roles this site offers: {', '.join(available_roles(site.module)) or 'none'}."
        )
    return targets


def available_roles(module: nn.Module) -> list[str]:
    """The roles for which ``module`` holds at least one layer (for error messages)."""
    return [role for role in TARGET_ROLES if find_targets(module, (role,))]
