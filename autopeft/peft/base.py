"""The contract every PEFT method follows, and the registry that holds them.

A method is one subclass of :class:`PeftMethod` in its own module, registered with
:func:`register_method`. It declares the site kinds it fits (``vit``/``cnn``), a frozen config
dataclass with its hyperparameters, and implements :meth:`PeftMethod.inject`, which changes layers
inside a site's module (or, for a site that is one layer, that layer in its parent) and returns
the parameters that must train. Layers it adds are subclasses of
:class:`PeftLayer`; those that are linear also subclass :class:`MergeableLayer` and know how to fold
themselves back into one plain layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from autopeft._plugins import load_registry
from autopeft.errors import PlanError, did_you_mean

__all__ = [
    "MethodConfig",
    "PeftMethod",
    "PeftLayer",
    "MergeableLayer",
    "InjectContext",
    "register_method",
    "BUILTIN_MODULES",
    "get_method",
    "registered_methods",
]


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's hyperparameters. Subclasses are frozen dataclasses whose fields carry
    ``metadata={"help": ...}`` and whose ``__post_init__`` raises ``ValueError`` on a bad value."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), ready for YAML."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass
class InjectContext:
    """What :func:`autopeft.peft.apply_plan` hands every method besides the site.

    Args:
        model: the whole model the plan is applied to.
        base_param_count: parameters of ``model.net`` before any injection.
        param_names: ``id(parameter) -> name`` in ``model`` before any injection.
        importance: per-parameter importance scores (SH-PEFT), keyed like ``param_names``.
        sparse_selection: flat indices of selected entries per parameter name, read from a
            checkpoint; when given, SH-PEFT uses them instead of ranking ``importance``.
        unused: ids of parameters the network never uses (never trained, never selected).
        scratch: space for one method's ``prepare`` to pass results to its ``inject`` calls.
    """

    model: nn.Module
    base_param_count: int
    param_names: dict[int, str]
    importance: Mapping[str, torch.Tensor] | None = None
    sparse_selection: Mapping[str, torch.Tensor] | None = None
    unused: set[int] = field(default_factory=set)
    scratch: dict[str, Any] = field(default_factory=dict)

    def name_of(self, parameter: nn.Parameter) -> str:
        return self.param_names[id(parameter)]

    def is_unused(self, layer: nn.Module) -> bool:
        """Whether ``layer`` has parameters and the network uses none of them."""
        params = list(layer.parameters())
        return bool(params) and all(id(p) in self.unused for p in params)


class PeftLayer(nn.Module):
    """Marker base of every module a PEFT method adds to a network."""


class MergeableLayer(PeftLayer):
    """A PEFT layer that wraps ``base_layer`` and is linear in it, so it folds into one plain layer."""

    base_layer: nn.Module

    def merged(self) -> nn.Module:
        """Return ``base_layer`` with this layer's effect folded into its weights (in place)."""
        raise NotImplementedError


class PeftMethod:
    """One PEFT method, written once and applied by a plan onto every site it fits.

    Class attributes:
        name: the name plans use (``method: lora``).
        site_kinds: the site kinds the method can sit on.
        config_class: the frozen dataclass of its hyperparameters.
        mergeable: whether :meth:`merge` folds it into plain weights.
        identity_at_init: whether the network computes the same function right after injection.
        needs_importance: whether :meth:`prepare` reads per-weight importance scores, so that
            whoever applies the plan computes them first (SH-PEFT); search spaces then also draw
            the plan's ``train.shpeft_lambda``.
        trains_nothing: whether the method leaves its sites frozen on purpose (No-FT on a site):
            a plan entry that trains nothing is then no mistake, and a search space drops the
            entry from the plan it samples.
        space_params: names a search space may give besides the config's fields; :meth:`from_space`
            turns them into config values (VPT's ``first_stage``).
        summary_fields: the config fields a one-line plan summary shows, in this order (None:
            every field; results tables, reports).
        switchable: whether :meth:`switch_off` can give a site injected with the method back the
            pre-trained function after training (the prior's audit, ``autopeft.search.signals``).
            A method that is not the identity at injection must override :meth:`switch_off` or
            declare False (VPT: prompts change the token sequence from the start).
    """

    name: ClassVar[str] = ""
    site_kinds: ClassVar[tuple[str, ...]] = ()
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = True
    needs_importance: ClassVar[bool] = False
    trains_nothing: ClassVar[bool] = False
    space_params: ClassVar[tuple[str, ...]] = ()
    summary_fields: ClassVar[tuple[str, ...] | None] = None
    switchable: ClassVar[bool] = True

    def from_space(self, values: Mapping[str, Any], sites: Sequence[Any]) -> dict[str, Any]:
        """Config values from what a search space drew for one group of ``sites`` (objects with
        ``name``, ``role``, ``kind`` and ``stage``, in forward order); resolves :attr:`space_params`.
        By default the values are the config's fields already."""
        return dict(values)

    def prepare(self, sites: Sequence[Any], config: MethodConfig, context: InjectContext) -> None:
        """Called once per plan entry with every site it matched, before any :meth:`inject`."""

    def inject(self, site: Any, config: MethodConfig, context: InjectContext) -> list[nn.Parameter]:
        """Change the layers inside ``site.module`` and return the parameters that must train."""
        raise NotImplementedError

    def merge(self, module: nn.Module) -> None:
        """Fold every :class:`MergeableLayer` inside ``module`` into a plain layer, in place."""
        replace_mergeable_layers(module)

    def switch_off(self, params: Sequence[nn.Parameter], at_injection: Sequence[torch.Tensor]) -> None:
        """Make one site injected with this method compute the pre-trained function again.

        Args:
            params: the parameters :meth:`inject` returned for the site, possibly trained since.
            at_injection: their values right after injection, in the same order.

        By default each parameter gets its injection-time value back. For a method that is the
        identity at injection (:attr:`identity_at_init`) that is exactly the pre-trained function:
        LoRA's ``B`` is 0 again, an adapter's up-projection 0, SSF's scale 1 and shift 0, SH-PEFT's
        deltas 0, and norms and biases (LayerNorm, BitFit, Full) their pre-trained values.
        """
        if not self.switchable:
            raise PlanError(f"PEFT method {self.name!r} cannot be switched off (its `switchable` is False).")
        if len(params) != len(at_injection):
            raise ValueError(f"`at_injection` must hold one tensor per parameter ({len(params)}), but got {len(at_injection)}.")
        with torch.no_grad():
            for param, value in zip(params, at_injection):
                param.copy_(value)


_REGISTRY: dict[str, PeftMethod] = {}

# One line per built-in method: importing the module runs its @register_method.
BUILTIN_MODULES: tuple[str, ...] = (
    "autopeft.peft.frozen",
    "autopeft.peft.full",
    "autopeft.peft.bitfit",
    "autopeft.peft.layernorm",
    "autopeft.peft.lora",
    "autopeft.peft.adapter",
    "autopeft.peft.ssf",
    "autopeft.peft.vpt",
    "autopeft.peft.shpeft",
)


def register_method(cls: type[PeftMethod]) -> type[PeftMethod]:
    """Class decorator that registers a method under ``cls.name``; refuses duplicates."""
    if not cls.name or not cls.name.isidentifier():
        raise ValueError(f"`name` of a PEFT method must be an identifier, but got {cls.name!r}.")
    if cls.name in _REGISTRY:
        raise ValueError(f"A PEFT method named {cls.name!r} is already registered.")
    if not cls.site_kinds:
        raise ValueError(f"PEFT method {cls.name!r} must declare the site kinds it fits.")
    if not (dataclasses.is_dataclass(cls.config_class) and issubclass(cls.config_class, MethodConfig)):
        raise ValueError(f"`config_class` of PEFT method {cls.name!r} must be a MethodConfig dataclass.")
    fields = cls.config_class.field_names()
    clash = [p for p in cls.space_params if p in fields]
    if clash:
        raise ValueError(f"`space_params` of PEFT method {cls.name!r} must not repeat config fields, but got {clash}.")
    unknown = [f for f in (cls.summary_fields or ()) if f not in fields]
    if unknown:
        raise ValueError(f"`summary_fields` of PEFT method {cls.name!r} must be config fields ({', '.join(fields) or 'none'}), but got {unknown}.")
    if cls.switchable and not cls.identity_at_init and cls.switch_off is PeftMethod.switch_off:
        raise ValueError(f"PEFT method {cls.name!r} is not the identity at injection, so restoring its injection-time values "
                         "does not switch it off: override `switch_off` or declare `switchable = False`.")
    _REGISTRY[cls.name] = cls()
    return cls


def _load_builtin() -> None:
    load_registry(BUILTIN_MODULES)  # and third-party methods ($AUTOPEFT_PLUGINS), also in Ray workers


def registered_methods() -> dict[str, PeftMethod]:
    """Name -> method instance of every registered PEFT method."""
    _load_builtin()

    def order(item: tuple[str, PeftMethod]) -> int:
        module = type(item[1]).__module__
        return BUILTIN_MODULES.index(module) if module in BUILTIN_MODULES else len(BUILTIN_MODULES)

    return dict(sorted(_REGISTRY.items(), key=order))


def get_method(name: str) -> PeftMethod:
    """The registered method called ``name``; a PlanError lists the valid names otherwise."""
    _load_builtin()
    method = _REGISTRY.get(name)  # not registered_methods(): it sorts, and plans look methods up often
    if method is None:
        methods = registered_methods()
        raise PlanError(f"Unknown PEFT method {name!r}{did_you_mean(name, methods)}; methods: {', '.join(methods)}.")
    return method


def build_config(method: PeftMethod, hyperparameters: Mapping[str, Any], where: str) -> MethodConfig:
    """Make ``method``'s config from plan values; unknown names or bad values raise PlanError.

    Args:
        method: the registered method.
        hyperparameters: the site entry without its ``method`` key.
        where: the place in the plan, for messages (``sites['encoder.*']``).
    """
    valid = method.config_class.field_names()
    for key in hyperparameters:
        if key not in valid:
            listing = ", ".join(valid) if valid else "none"
            raise PlanError(
                f"{where}: unknown hyperparameter {key!r} for method {method.name!r}"
                f"{did_you_mean(str(key), valid)}; valid ones: {listing}."
            )
    try:
        return method.config_class(**hyperparameters)
    except (TypeError, ValueError) as err:
        raise PlanError(f"{where} (method {method.name!r}): {err}") from err


def replace_mergeable_layers(root: nn.Module) -> int:
    """Replace every :class:`MergeableLayer` under ``root`` by its merged plain layer.

    Returns:
        How many layers were merged.
    """
    # ``root`` itself is skipped: only its parent can replace it.
    found = [(name, module) for name, module in root.named_modules() if name and isinstance(module, MergeableLayer)]
    # Deepest first, so a wrapper whose base is itself a wrapper sees a plain layer.
    for name, module in sorted(found, key=lambda item: item[0].count("."), reverse=True):
        set_submodule(root, name, module.merged())
    return len(found)


def set_submodule(root: nn.Module, dotted_name: str, new: nn.Module) -> None:
    """Put ``new`` at ``dotted_name`` under ``root`` (the parent must already exist)."""
    parent_name, _, child = dotted_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def replace_layer(context: InjectContext, site_module: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name`` inside ``site_module``; ``name == ""`` replaces the site module
    itself inside ``context.model`` (a site that is one layer)."""
    if name:
        set_submodule(site_module, name, new)
        return
    set_submodule(context.model, qualified_name(context.model, site_module), new)


def qualified_name(root: nn.Module, module: nn.Module) -> str:
    """The dotted name of ``module`` inside ``root``."""
    for name, candidate in root.named_modules():
        if candidate is module:
            if not name:
                raise PlanError("A site cannot be the whole model.")
            return name
    raise PlanError(f"{type(module).__name__} is not part of the model.")


def dispatch(
    layer: nn.Module, table: Sequence[tuple[type | tuple[type, ...], Callable[..., Any]]], what: str
) -> Callable[..., Any]:
    """The factory of the first ``(layer type, factory)`` entry that ``layer`` is an instance of.

    Raises:
        PlanError: listing the supported layer types when none matches.
    """
    for layer_type, factory in table:
        if isinstance(layer, layer_type):
            return factory
    types = [t for entry, _ in table for t in (entry if isinstance(entry, tuple) else (entry,))]
    supported = ", ".join(t.__name__ for t in types)
    raise PlanError(f"{what} cannot wrap a {type(layer).__name__}; supported layers: {supported}.")
