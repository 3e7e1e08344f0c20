"""Find the PEFT sites of a network autopeft has never seen, from one traced forward pass.

A network is run once on a dummy input of the crop size (``1 x C_in x D x H x W``, eval mode, no
gradients) with forward hooks on every module. From that trace:

- **blocks**: the modules at the level of the network's stages. The root is split into its
  children; a ``ModuleList``/``ModuleDict`` into its elements (DynUNet's ``downsamples``); a child
  is split further into its children when it holds such a list of attention blocks (a transformer
  encoder or stage: MONAI's ViT into its patch embedding and blocks, a Swin stage into its blocks
  and patch merging, a CvT stage into its embedding and blocks) or when its outputs go down in
  resolution and back up (a U inside one module: MONAI's ``UNet`` nests ``SkipConnection`` s; never a block with
  attention, whose strided key/value projections look like one).
  Everything else is one block. A block that the forward pass never calls or that holds no weight
  layer (only norms) is not a site, nor is the last block called when it is a single weight layer:
  the output projection, as small as any PEFT module one could attach to it (its bias is reached
  by BitFit). Sites never nest, and a module shared by
  two parents (DynUNet's ``skip_layers``) is a site once.
- **stage**: the block output's resolution level, ``log2(input side / output side)`` (the largest
  over the three axes; for ``B x N x C`` tokens, from ``N`` against the input volume).
- **role**, from the levels along forward order: the longest tail of blocks whose level never
  rises is the decoder, except its first blocks at one level: at the deepest level the network
  reaches, the last of them is the bottleneck and those before it end the encoder (CVT-GAN's
  stage-4 blocks before its bottleneck conv); at another level, the first of them is an encoder
  block leading into the decoder (UNETR's ``encoder4`` before ``decoder5``). Every block before
  that tail is an encoder block.
- **kind**: ``vit`` when the block contains attention (:data:`ATTENTION_TYPES`), else ``cnn``.

Site names are ``<role>.<module path>`` (``encoder.down_1``, ``decoder.upcat_4``), so plans and
space groups can use patterns such as ``decoder.*``. :func:`apply_overrides` renames, merges and
excludes sites from a small YAML mapping the user writes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from monai.networks.blocks.crossattention import CrossAttentionBlock
from monai.networks.blocks.selfattention import SABlock
from monai.networks.nets.swin_unetr import WindowAttention
from torch import nn

from autopeft.backbones.blocks.cvt import ConvProjectionAttention
from autopeft.errors import ConfigError, did_you_mean

__all__ = ["FoundSite", "ATTENTION_TYPES", "discover_sites", "apply_overrides", "OVERRIDE_KEYS"]


ATTENTION_TYPES: tuple[type[nn.Module], ...] = (SABlock, CrossAttentionBlock, WindowAttention, nn.MultiheadAttention,
                                                 ConvProjectionAttention)
"""Module types that make a block a ``vit`` site: MONAI's ``SABlock`` and ``CrossAttentionBlock``,
Swin's ``WindowAttention``, ``nn.MultiheadAttention``, and CVT-GAN's conv-projection attention."""

_WEIGHT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LIST_TYPES = (nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class FoundSite:
    """A site found in a network.

    Args:
        name: ``<role>.<module path>``, or what an override renamed it to.
        path: the module's dotted path inside the network.
        role: ``encoder``, ``bottleneck`` or ``decoder``.
        kind: ``vit`` or ``cnn``.
        stage: resolution level of the block's output (0 = the input's).
        input_shape: shape of the block's first tensor input in the trace.
        output_shape: shape of the block's output in the trace.
    """

    name: str
    path: str
    role: str
    kind: str
    stage: int
    input_shape: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()

    @property
    def takes_tokens(self) -> bool:
        """Whether the block is called with ``B x N x C`` tokens (VPT's protocol)."""
        return len(self.input_shape) == 3


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _level(shape: tuple[int, ...], crop: Sequence[int], batch: int = 1) -> int | None:
    """Resolution level of a tensor of ``shape`` against an input of spatial size ``crop``."""
    spatial = len(crop)
    if len(shape) == spatial + 2 and shape[0] == batch:
        # Channels first (B x C x D x H x W), or last (B x D x H x W x C: Swin's blocks) when only
        # that reading gives power-of-two ratios to the input.
        for sides in (shape[2:], shape[1:-1]):
            logs = [math.log2(c / s) for c, s in zip(crop, sides) if s > 0]
            if len(logs) == spatial and all(abs(v - round(v)) < 1e-6 for v in logs):
                return max(0, round(max(logs)))
        return None
    if len(shape) == 3 and shape[0] == batch and shape[1] > 0:  # B x N x C tokens (not Swin's windows)
        return max(0, round(math.log2(math.prod(crop) / shape[1]) / spatial))
    return None


@dataclass
class _Trace:
    order: dict[int, int]  # id(module) -> index of its first call
    inputs: dict[int, tuple[int, ...]]
    outputs: dict[int, tuple[int, ...]]


def _trace(net: nn.Module, example: torch.Tensor) -> _Trace:
    trace = _Trace({}, {}, {})
    handles = []

    def pre(module: nn.Module, args: tuple) -> None:
        if id(module) not in trace.order:
            trace.order[id(module)] = len(trace.order)
            first = _first_tensor(args)
            trace.inputs[id(module)] = tuple(first.shape) if first is not None else ()

    def post(module: nn.Module, args: tuple, output: Any) -> None:
        if id(module) not in trace.outputs:
            first = _first_tensor(output)
            trace.outputs[id(module)] = tuple(first.shape) if first is not None else ()

    for module in net.modules():
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    modes = {module: module.training for module in net.modules()}
    try:
        net.eval()
        with torch.no_grad():
            net(example)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return trace


def _weight_layers(module: nn.Module) -> int:
    return sum(isinstance(m, _WEIGHT_TYPES) for m in module.modules())


def _holds_attention_list(module: nn.Module) -> bool:
    """Whether ``module`` (not itself a list) holds a ModuleList/ModuleDict whose elements contain
    attention: a transformer encoder (MONAI's ViT, Swin), whose blocks are the sites."""
    for name, inner in module.named_modules():
        if name and isinstance(inner, _LIST_TYPES):
            if any(isinstance(m, ATTENTION_TYPES) for element in inner.children() for m in element.modules()):
                return True
    return False


def _is_u(module: nn.Module, trace: _Trace, crop: Sequence[int]) -> bool:
    """Whether the outputs inside ``module``, in call order, go deeper and come back up."""
    calls = sorted(((trace.order[id(m)], m) for m in module.modules()
                    if m is not module and id(m) in trace.order and id(m) in trace.outputs), key=lambda c: c[0])
    levels = [lvl for _, m in calls if (lvl := _level(trace.outputs[id(m)], crop)) is not None]
    if len(levels) < 2:
        return False
    start = _level(trace.inputs.get(id(module), ()), crop)
    deepest = max(levels)
    return min(levels[0], deepest if start is None else start) < deepest and levels[-1] < deepest


def _blocks(net: nn.Module, trace: _Trace, crop: Sequence[int]) -> list[tuple[str, nn.Module]]:
    blocks: list[tuple[str, nn.Module]] = []
    taken: set[int] = set()  # ids of parameters inside a block already

    def params(module: nn.Module) -> set[int]:
        return {id(p) for p in module.parameters()}

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            owned = params(child)
            if not owned or owned <= taken:
                continue
            attention = any(isinstance(m, ATTENTION_TYPES) for m in child.modules())
            # A U inside an attention block is its strided key/value projections (CvT): not stages.
            u_shaped = not attention and _is_u(child, trace, crop)
            if isinstance(child, _LIST_TYPES) or _holds_attention_list(child) or u_shaped or owned & taken:
                visit(f"{path}.", child)
            else:
                blocks.append((path, child))
                taken.update(owned)

    visit("", net)
    return blocks


def _roles(levels: list[int]) -> list[str]:
    """Role of each block from the levels of its output, in forward order (module docstring)."""
    count = len(levels)
    start = count - 1
    while start > 0 and levels[start - 1] >= levels[start]:
        start -= 1
    roles = ["encoder"] * start + ["decoder"] * (count - start)
    deepest = max(levels)
    top = levels[start]
    lead = start
    while lead < count and levels[lead] == top:
        lead += 1
    if top == deepest and start > 0:
        # The blocks that reach the deepest level end the encoder; the last of them turns back.
        for i in range(start, lead - 1):
            roles[i] = "encoder"
        roles[lead - 1] = "bottleneck"
    elif top == deepest and lead < count:  # a network that starts at its deepest level: an encoder
        for i in range(start, lead):
            roles[i] = "encoder"
    elif lead - start > 1:  # an encoder block at the turning level leads into the decoder
        roles[start] = "encoder"
    return roles


def discover_sites(net: nn.Module, crop: Sequence[int], in_channels: int = 1) -> list[FoundSite]:
    """The sites of ``net``, in forward order (module docstring).

    Args:
        net: the network, ``B x in_channels x D x H x W -> B x C x D x H x W``.
        crop: the input's spatial size, ``D x H x W``.
        in_channels: input channels. Defaults to 1.

    Raises:
        ConfigError: no block with weight layers is found, or the trace finds no encoder or no
            decoder block.

    >>> from monai.networks.nets import BasicUNet
    >>> found = discover_sites(BasicUNet(3, 1, 1, features=(4, 4, 8, 8, 16, 4)), (32, 32, 32))
    >>> [s.name for s in found][:2], found[4].role
    (['encoder.conv_0', 'encoder.down_1'], 'bottleneck')
    """
    reference = next(net.parameters(), None)
    example = torch.zeros(1, in_channels, *crop, device=reference.device if reference is not None else "cpu",
                          dtype=reference.dtype if reference is not None else torch.float32)
    trace = _trace(net, example)
    candidates = []
    blocks = [(path, module) for path, module in _blocks(net, trace, crop)
              if id(module) in trace.order and _weight_layers(module) > 0]
    if len(blocks) > 1 and _weight_layers(max(blocks, key=lambda b: trace.order[id(b[1])])[1]) == 1:
        last = max(blocks, key=lambda b: trace.order[id(b[1])])
        blocks.remove(last)  # the output layer
    for path, module in blocks:
        level = _level(trace.outputs.get(id(module), ()), crop)
        if level is None:
            continue
        candidates.append((trace.order[id(module)], path, module, level))
    if not candidates:
        raise ConfigError(f"{type(net).__name__}: no block with weight layers runs in a forward pass at "
                          f"{'x'.join(map(str, crop))}; write its sites in a --sites-override file.")
    candidates.sort(key=lambda item: item[0])
    roles = _roles([level for *_, level in candidates])
    found = []
    for (_, path, module, level), role in zip(candidates, roles):
        kind = "vit" if any(isinstance(m, ATTENTION_TYPES) for m in module.modules()) else "cnn"
        found.append(FoundSite(f"{role}.{path}", path, role, kind, level, trace.inputs.get(id(module), ()),
                               trace.outputs.get(id(module), ())))
    return found


OVERRIDE_KEYS = ("rename", "merge", "exclude", "roles", "kinds", "stages")


def apply_overrides(found: Sequence[FoundSite], overrides: Mapping[str, Any], net: nn.Module, *, source: str) -> list[FoundSite]:
    """Apply a user's corrections, read from YAML (``yaml.safe_load``) by the caller:

    .. code-block:: yaml

        exclude: [encoder.conv_0]                  # sites (names as found) to leave out
        merge: {decoder.up: [decoder.upcat_2, decoder.upcat_1]}   # one site: their common parent
        rename: {bottleneck.down_4: bottleneck}    # new names
        roles: {encoder.down_4: bottleneck}        # and new roles, kinds or stages
        kinds: {}
        stages: {}

    Names refer to the sites as discovered; ``merge`` makes the modules' nearest common parent one
    site, which must hold no other site.

    Raises:
        ConfigError: an unknown key or site name (with the closest one), or a merge whose parent
            holds other sites; the message names ``source``.
    """
    _check_override_keys(overrides, source)
    sites = list(found)
    drop = _excluded_names(overrides, sites, source)
    for new_name, members in _override_mapping(overrides, "merge", source).items():
        sites = _merge_sites(sites, new_name, members, net, source)
    sites = [s for s in sites if s.name not in drop]
    sites = _set_site_fields(sites, overrides, source)
    sites = _rename_sites(sites, overrides, source)
    if not sites:
        raise ConfigError(f"{source}: the override leaves no site.")
    return sites


def _check_override_keys(overrides: Any, source: str) -> None:
    """Fail on an override that is no mapping or has a key outside ``OVERRIDE_KEYS``.

    Args:
        overrides: the override as read from YAML.
        source: where it came from, for the message.
    """
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{source}: a sites override must be a mapping with keys {', '.join(OVERRIDE_KEYS)}.")
    for key in overrides:
        if key not in OVERRIDE_KEYS:
            raise ConfigError(f"{source}: unknown key {key!r}{did_you_mean(str(key), OVERRIDE_KEYS)}; valid keys: "
                              f"{', '.join(OVERRIDE_KEYS)}.")


def _site_name(name: Any, sites: Sequence[FoundSite], where: str, source: str) -> str:
    """``name`` if it names one of ``sites``; else fail with the closest name.

    Args:
        name: the name the override gives.
        sites: the sites as they stand at this step of the override.
        where: the override's entry, for the message (``exclude``, ``merge['x']``, ...).
        source: where the override came from, for the message.
    """
    names = [s.name for s in sites]
    if name not in names:
        raise ConfigError(f"{source}: {where} names {name!r}{did_you_mean(str(name), names)}, which is no site; "
                          f"sites: {', '.join(names)}.")
    return str(name)


def _override_mapping(overrides: Mapping[str, Any], key: str, source: str) -> Mapping[str, Any]:
    """The override's ``key`` entry (empty when absent), which must map site names to values.

    Args:
        overrides: the override as read from YAML.
        key: one of ``merge``, ``rename``, ``roles``, ``kinds``, ``stages``.
        source: where the override came from, for the message.
    """
    value = overrides.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: `{key}` must map site names to values, but got {value!r}.")
    return value


def _excluded_names(overrides: Mapping[str, Any], sites: Sequence[FoundSite], source: str) -> set[str]:
    """The ``exclude`` phase: the names to leave out, checked against the sites as discovered.

    Args:
        overrides: the override as read from YAML.
        sites: the sites as discovered.
        source: where the override came from, for the message.
    """
    excluded = overrides.get("exclude") or []
    if not isinstance(excluded, list):
        raise ConfigError(f"{source}: `exclude` must be a list of site names, but got {excluded!r}.")
    return {_site_name(name, sites, "exclude", source) for name in excluded}


def _merge_sites(sites: list[FoundSite], new_name: Any, members: Any, net: nn.Module, source: str) -> list[FoundSite]:
    """One ``merge`` entry: ``members`` become one site, their nearest common parent, where the first stood.

    Args:
        sites: the sites before this merge.
        new_name: the merged site's name.
        members: the names of the sites to merge (two or more).
        net: the network, to read the parent module's kind.
        source: where the override came from, for the message.

    Returns:
        The sites after this merge.
    """
    if not isinstance(members, list) or len(members) < 2:
        raise ConfigError(f"{source}: merge[{new_name!r}] must list two or more sites, but got {members!r}.")
    chosen = [next(s for s in sites if s.name == _site_name(m, sites, f"merge[{new_name!r}]", source)) for m in members]
    parts = [s.path.split(".") for s in chosen]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    parent = ".".join(common)
    if not parent:
        raise ConfigError(f"{source}: merge[{new_name!r}]: {', '.join(members)} have no common parent below the "
                          "network itself; merge sites that share a parent module.")
    inside = [s.name for s in sites if (s.path + ".").startswith(parent + ".") and s.name not in members]
    if inside:
        raise ConfigError(f"{source}: merge[{new_name!r}]: their common parent {parent!r} also holds {', '.join(inside)}; "
                          "list those too or merge other sites.")
    module = net.get_submodule(parent)
    kind = "vit" if any(isinstance(m, ATTENTION_TYPES) for m in module.modules()) else "cnn"
    merged = FoundSite(str(new_name), parent, chosen[0].role, kind, chosen[-1].stage, chosen[0].input_shape,
                       chosen[-1].output_shape)
    first = sites.index(chosen[0])
    sites = [s for s in sites if s not in chosen]
    sites.insert(min(first, len(sites)), merged)
    return sites


def _set_site_fields(sites: list[FoundSite], overrides: Mapping[str, Any], source: str) -> list[FoundSite]:
    """The ``roles``, ``kinds`` and ``stages`` phase: new values for the named sites.

    Args:
        sites: the sites after merging and excluding.
        overrides: the override as read from YAML.
        source: where the override came from, for the message.

    Returns:
        The sites with their new roles, kinds and stages.
    """
    for key, field_name, valid in (("roles", "role", ("encoder", "bottleneck", "decoder")), ("kinds", "kind", ("vit", "cnn")),
                                   ("stages", "stage", None)):
        for name, value in _override_mapping(overrides, key, source).items():
            _site_name(name, sites, key, source)
            if valid is not None and value not in valid:
                raise ConfigError(f"{source}: {key}[{name!r}] must be one of {', '.join(valid)}, but got {value!r}.")
            if valid is None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"{source}: {key}[{name!r}] must be a non-negative integer, but got {value!r}.")
            sites = [replace(s, **{field_name: value}) if s.name == name else s for s in sites]
    return sites


def _rename_sites(sites: list[FoundSite], overrides: Mapping[str, Any], source: str) -> list[FoundSite]:
    """The ``rename`` phase, in the override's order; a new name must be unused at its step.

    Args:
        sites: the sites after the other phases.
        overrides: the override as read from YAML.
        source: where the override came from, for the message.

    Returns:
        The renamed sites.
    """
    for old, new in _override_mapping(overrides, "rename", source).items():
        _site_name(old, sites, "rename", source)
        if not isinstance(new, str) or not new or new in [s.name for s in sites]:
            raise ConfigError(f"{source}: rename[{old!r}] must be a new, unused site name, but got {new!r}.")
        sites = [replace(s, name=new) if s.name == old else s for s in sites]
    return sites
