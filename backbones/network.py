"""A user's own 3D image-to-image network as a backbone, by reference, with sites found automatically.

Three kinds of reference (``--backbone``):

================================  ==============================================================
``monai:NAME``                    a class of ``monai.networks.nets`` (``monai:BasicUNet``), built
                                  with ``--net-args`` (JSON, or a JSON/YAML file read with
                                  ``yaml.safe_load``)
``bundle:DIR``                    a MONAI bundle folder: its ``network_def`` (configs/inference.json,
                                  else train.json), instantiated by ``monai.bundle.ConfigParser``
``module.path:Class``             a class of a Python module installed where autopeft runs
================================  ==============================================================

The last two run code the user named (a bundle's ``_target_`` and ``$`` expressions, a module's
import), as MONAI bundles do. Nothing else from a file a user hands in is imported or executed:
net-args and site overrides are data (``yaml.safe_load``), weights are read without unpickling.

The network must map ``B x C_in x D x H x W`` to ``B x C_out x D x H x W`` at the crop size
(``C_in = C_out = 1`` unless ``--in-channels``/``--out-channels`` say otherwise):
:meth:`NetworkBackbone.check_image_to_image` refuses anything else, naming the shapes. Where the
constructor takes them and the net-args do not give them, ``spatial_dims`` (3), ``in_channels``,
``out_channels`` and ``img_size`` (the crop) are filled in.

Sites come from :func:`autopeft.backbones.discovery.discover_sites` (one traced forward pass), corrected by
an optional override (:func:`autopeft.backbones.discovery.apply_overrides`). A reference is registered in
the backbone registry under its spec (``monai:BasicUNet``) with one preset per configuration,
named ``net-<digest>`` of everything that defines it (net-args, channels, crop, batch, schedules,
overrides, a bundle's config): caches keyed by backbone and preset (pre-training, importance) are
then keyed by the net-args too. Every process that looks the backbone up must register it first:
:func:`register_network` also puts the reference in ``$AUTOPEFT_NETWORKS`` (JSON), which the
registry reads in every process (Ray workers inherit it; a cluster's get it through the runtime
environment, as ``$AUTOPEFT_PLUGINS``), and a search writes it to its run directory
(``network.json``) for whatever reads the run later.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import monai.networks.nets as monai_nets
import torch
import yaml
from monai.bundle import ConfigParser
from torch import nn

from autopeft._io import atomic_write_text
from autopeft.backbones import base
from autopeft.backbones.base import Backbone, FinetuneSchedule, Preset, PretrainSchedule, Site
from autopeft.backbones.discovery import FoundSite, apply_overrides, discover_sites
from autopeft.errors import ConfigError, did_you_mean

__all__ = ["NetworkRef", "NetworkBackbone", "is_network_spec", "register_network", "load_networks", "NETWORKS_ENV",
           "parse_net_args", "network_ref", "save_run_network", "load_run_network", "registered_ref", "RUN_FILE"]

RUN_FILE = "network.json"

NETWORKS_ENV = "AUTOPEFT_NETWORKS"
_DEFAULT_CROP = (32, 32, 32)
_DEFAULT_BATCH = 2


def is_network_spec(name: str) -> bool:
    """Whether ``--backbone`` names a network by reference (``monai:``, ``bundle:``, ``module:Class``)."""
    return ":" in str(name)


@dataclass(frozen=True)
class NetworkRef:
    """Everything that rebuilds a user's network in any process (plain JSON data).

    Args:
        spec: ``monai:NAME``, ``bundle:DIR`` (absolute) or ``module.path:Class``.
        net_args: constructor arguments (``monai:`` and ``module:Class``). Defaults to none.
        bundle_config: a bundle's parsed config (``network_def`` and what it refers to).
        in_channels: input channels. Defaults to 1.
        out_channels: output channels. Defaults to 1.
        crop: training crop and sliding window, ``D x H x W``. Defaults to 32 x 32 x 32.
        batch_size: training batch. Defaults to 2.
        finetune: ``FinetuneSchedule`` fields that differ from its defaults.
        pretrain: ``PretrainSchedule`` fields that differ from its defaults.
        sites_override: a site override (see :func:`autopeft.backbones.discovery.apply_overrides`).
    """

    spec: str
    net_args: dict[str, Any] = field(default_factory=dict)
    bundle_config: dict[str, Any] | None = None
    in_channels: int = 1
    out_channels: int = 1
    crop: tuple[int, ...] = _DEFAULT_CROP
    batch_size: int = _DEFAULT_BATCH
    finetune: dict[str, Any] = field(default_factory=dict)
    pretrain: dict[str, Any] = field(default_factory=dict)
    sites_override: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if len(self.crop) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.crop):
            raise ConfigError(f"`crop` must be three positive integers (D, H, W), but got {self.crop!r}.")
        object.__setattr__(self, "crop", tuple(int(s) for s in self.crop))
        if self.batch_size < 1:
            raise ConfigError(f"`batch_size` must be at least 1, but got {self.batch_size}.")
        if self.in_channels < 1 or self.out_channels < 1:
            raise ConfigError(f"`in_channels` and `out_channels` must be at least 1, but got {self.in_channels} and {self.out_channels}.")
        try:
            FinetuneSchedule(**self.finetune)
            PretrainSchedule(**self.pretrain)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{self.spec}: bad schedule: {err}") from err

    # Identity -----------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | Mapping[str, Any]) -> NetworkRef:
        data = dict(json.loads(text) if isinstance(text, str) else text)
        data["crop"] = tuple(data.get("crop") or _DEFAULT_CROP)
        return cls(**data)

    @property
    def name(self) -> str:
        """The registry name: the spec."""
        return self.spec

    @property
    def preset_name(self) -> str:
        """``net-`` and 12 hex digits of everything that defines the configuration."""
        return "net-" + hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    def preset(self) -> Preset:
        return Preset(self.preset_name, self.crop, self.batch_size, {}, FinetuneSchedule(**self.finetune),
                      PretrainSchedule(**self.pretrain))

    def describe(self) -> str:
        args = "" if self.bundle_config is not None else f" {json.dumps(self.net_args, sort_keys=True)}"
        return f"{self.spec}{args}"

    # Building -----------------------------------------------------------------------------------
    def network_class(self) -> type[nn.Module] | None:
        """The class a ``monai:`` or ``module:Class`` spec names (None for a bundle)."""
        kind, _, rest = self.spec.partition(":")
        if kind == "bundle":
            return None
        if kind == "monai":
            names = [n for n in dir(monai_nets)
                     if isinstance(getattr(monai_nets, n), type) and issubclass(getattr(monai_nets, n), nn.Module)]
            if rest not in names:
                raise ConfigError(f"--backbone {self.spec}: monai.networks.nets has no network {rest!r}{did_you_mean(rest, names)}; "
                                  f"e.g. {', '.join(n for n in ('BasicUNet', 'UNet', 'SegResNet', 'DynUNet', 'UNETR', 'SwinUNETR') if n in names)}.")
            return getattr(monai_nets, rest)
        if not rest or not kind:
            raise ConfigError(f"--backbone {self.spec}: write monai:NAME, bundle:DIR or module.path:Class.")
        try:
            module = importlib.import_module(kind)
        except ImportError as err:
            raise ConfigError(f"--backbone {self.spec}: module {kind!r} cannot be imported ({err}); install it where "
                              "autopeft runs (every node of a cluster).") from err
        cls = getattr(module, rest, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ConfigError(f"--backbone {self.spec}: {kind} has no torch.nn.Module class {rest!r}.")
        return cls

    def constructor_args(self) -> dict[str, Any]:
        """``net_args`` with ``spatial_dims``, ``in_channels``, ``out_channels`` and ``img_size``
        filled in where the constructor takes them and they are not given."""
        cls = self.network_class()
        if cls is None:
            return {}
        args = dict(self.net_args)
        try:
            accepted = inspect.signature(cls).parameters
        except (TypeError, ValueError):
            return args
        for key, value in (("spatial_dims", 3), ("in_channels", self.in_channels), ("out_channels", self.out_channels),
                           ("img_size", list(self.crop))):
            if key in accepted and key not in args:
                args[key] = value
        return args

    def network_def(self) -> dict[str, Any]:
        """The network as a MONAI bundle's ``network_def`` (``_target_`` and arguments): the
        user's own class, or a bundle's own ``network_def``."""
        if self.bundle_config is not None:
            return self.bundle_config["network_def"]
        cls = self.network_class()
        return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **self.constructor_args()}

    def build(self) -> nn.Module:
        """A fresh network (random weights)."""
        # Some constructors print (MONAI 1.6.0's BasicUNet prints its features): sent to stderr, so
        # that a command's stdout (JSON, tables) stays what the command writes.
        with contextlib.redirect_stdout(sys.stderr):
            network = self._construct()
        if not isinstance(network, nn.Module):
            raise ConfigError(f"--backbone {self.spec}: its network_def builds a {type(network).__name__}, not a torch.nn.Module.")
        return network

    def _construct(self):
        if self.bundle_config is not None:
            parser = ConfigParser(dict(self.bundle_config))
            try:
                network = parser.get_parsed_content("network_def", instantiate=True)
            except Exception as err:  # noqa: BLE001 - MONAI raises many types for a bad config
                raise ConfigError(f"--backbone {self.spec}: its network_def cannot be built ({type(err).__name__}: {err}).") from err
        else:
            cls = self.network_class()
            args = self.constructor_args()
            try:
                network = cls(**args)
            except (TypeError, ValueError, AssertionError) as err:
                try:
                    signature = f"{cls.__name__}{inspect.signature(cls)}"
                except (TypeError, ValueError):
                    signature = cls.__name__
                raise ConfigError(f"--net-args {json.dumps(self.net_args)} do not build {self.spec} ({type(err).__name__}: "
                                  f"{err}); its constructor: {signature}.") from err
        return network


def parse_net_args(text: str | None) -> dict[str, Any]:
    """``--net-args``: a JSON object, or a JSON/YAML file holding one (read with ``yaml.safe_load``).

    Raises:
        ConfigError: neither, or not a mapping; naming the flag and what was given.
    """
    if text is None or not str(text).strip():
        return {}
    raw = str(text)
    path = Path(raw).expanduser()
    where = "--net-args"
    if not raw.lstrip().startswith("{") and path.is_file():
        where = f"--net-args {path}"
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}: not valid JSON or YAML ({err}).") from err
    else:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--net-args {raw!r}: not a JSON object nor a file ({err.msg} at column {err.colno}); "
                              "e.g. --net-args '{\"features\": [8, 8, 16, 16, 32, 8]}'.") from err
    if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"{where}: must be a mapping of constructor argument names to values, but got {type(data).__name__}.")
    return dict(data)


def _bundle(folder: str) -> tuple[Path, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(absolute folder, its config with ``network_def``, its metadata, its training config) of a
    MONAI bundle; the last two empty where the bundle has none."""
    root = Path(folder).expanduser().resolve()
    configs = root / "configs"
    if not root.is_dir():
        raise ConfigError(f"--backbone bundle:{folder}: no such folder.")
    for name in ("inference.json", "inference.yaml", "train.json", "train.yaml"):
        if (configs / name).is_file():
            config = ConfigParser.load_config_file(str(configs / name))
            if "network_def" in config:
                break
    else:
        raise ConfigError(f"--backbone bundle:{folder}: no configs/inference.json (or train.json) with a `network_def`.")
    meta: dict[str, Any] = {}
    if (configs / "metadata.json").is_file():
        meta = dict(ConfigParser.load_config_file(str(configs / "metadata.json")))
    train: dict[str, Any] = {}
    for name in ("train.json", "train.yaml"):
        if (configs / name).is_file():
            # Only the training batch is taken from it (a plain number, never evaluated): see _bundle_defaults.
            train = dict(ConfigParser.load_config_file(str(configs / name)))
            break
    return root, dict(config), meta, train


def _plain_int(config: Mapping[str, Any], path: str) -> int | None:
    """A positive integer at ``a#b#c`` of a raw bundle config, or at the top-level id one ``@id``
    reference names; expressions (``$...``) and anything else give None (nothing is evaluated)."""
    value: Any = config
    for key in path.split("#"):
        value = value.get(key) if isinstance(value, Mapping) else None
    if isinstance(value, str) and value.startswith("@") and "#" not in value:
        value = config.get(value[1:])
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _bundle_defaults(meta: Mapping[str, Any], train: Mapping[str, Any]) -> dict[str, Any]:
    """Crop and channels from a bundle's ``network_data_format``, and the batch size from its
    ``configs/train.json`` (``train#dataloader#batch_size``, MONAI's bundle convention), where it
    has them. A bundle's training schedule is for training from scratch, not fine-tuning: not taken."""
    found: dict[str, Any] = {}
    batch = _plain_int(train, "train#dataloader#batch_size")
    if batch is not None:
        found["batch_size"] = batch
    formats = meta.get("network_data_format") or {}
    image = (formats.get("inputs") or {}).get("image") or {}
    pred = (formats.get("outputs") or {}).get("pred") or {}
    shape = image.get("spatial_shape")
    if isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape):
        found["crop"] = tuple(shape)
    if isinstance(image.get("num_channels"), int):
        found["in_channels"] = image["num_channels"]
    if isinstance(pred.get("num_channels"), int):
        found["out_channels"] = pred["num_channels"]
    return found


def network_ref(
    spec: str,
    *,
    net_args: Mapping[str, Any] | None = None,
    in_channels: int | None = None,
    out_channels: int | None = None,
    crop: Sequence[int] | None = None,
    batch_size: int | None = None,
    finetune: Mapping[str, Any] | None = None,
    pretrain: Mapping[str, Any] | None = None,
    sites_override: Mapping[str, Any] | None = None,
) -> NetworkRef:
    """A :class:`NetworkRef` from what the user gave; a bundle's metadata fills crop and channels,
    and its training config the batch size, that are not given. ``None`` means the default."""
    config = None
    defaults: dict[str, Any] = {}
    if spec.startswith("bundle:"):
        if net_args:
            raise ConfigError("--net-args: a bundle's network is its network_def; edit that instead of passing --net-args.")
        root, config, meta, train = _bundle(spec[len("bundle:"):])
        spec = f"bundle:{root}"
        defaults = _bundle_defaults(meta, train)
    given = {"in_channels": in_channels, "out_channels": out_channels, "crop": tuple(crop) if crop else None,
             "batch_size": batch_size}
    values = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    return NetworkRef(spec, dict(net_args or {}), config, finetune=dict(finetune or {}), pretrain=dict(pretrain or {}),
                      sites_override=dict(sites_override) if sites_override else None, **values)


# The found sites of each configuration: (name, path, role, kind, stage, input shape, output shape).
_SITES: dict[str, list] = {}


class NetworkBackbone(Backbone):
    """A user's network (:class:`NetworkRef`) as a backbone: ``B x C_in x D x H x W -> B x C_out x D x H x W``.

    Args:
        preset: the configuration's preset (crop, batch, schedules).
        ref: the reference it is built from.

    >>> from autopeft.backbones.network import network_ref, register_network
    >>> from autopeft.backbones import build_backbone
    >>> ref = network_ref("monai:BasicUNet", net_args={"features": [4, 4, 8, 8, 16, 4]})
    >>> model = build_backbone(*register_network(ref))
    >>> model(torch.rand(1, 1, 32, 32, 32)).shape
    torch.Size([1, 1, 32, 32, 32])
    """

    loss = "l1"

    def __init__(self, preset: Preset, ref: NetworkRef) -> None:
        super().__init__(preset)
        self.ref = ref
        self.in_channels = ref.in_channels
        self.network = ref.build()

    @property
    def net(self) -> nn.Module:
        return self.network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"{self.ref.spec} returned a {type(out).__name__}; autopeft needs one tensor "
                             "B x C x D x H x W (turn deep supervision off).")
        return out

    def found_sites(self):
        """The :class:`autopeft.backbones.discovery.FoundSite` list (traced once per configuration)."""
        key = self.preset.name
        if key not in _SITES:
            found = discover_sites(self.network, self.preset.crop_size, self.ref.in_channels)
            if self.ref.sites_override:
                found = apply_overrides(found, self.ref.sites_override, self.network, source="--sites-override")
            _SITES[key] = [tuple(asdict(s).values()) for s in found]
        return [FoundSite(*row) for row in _SITES[key]]

    def sites(self) -> list[Site]:
        if getattr(self, "_site_cache", None) is None:
            self._site_cache = [Site(s.name, s.role, s.kind, self.network.get_submodule(s.path), s.stage)
                                for s in self.found_sites()]
        return list(self._site_cache)

    def check_image_to_image(self) -> None:
        """One forward pass at the crop size; refuses a network whose output is not
        ``1 x out_channels x crop`` (or that fails on such an input), naming the shapes."""
        crop = tuple(self.preset.crop_size)
        want_in = (1, self.ref.in_channels, *crop)
        want_out = (1, self.ref.out_channels, *crop)
        reference = next(self.network.parameters(), None)
        x = torch.zeros(want_in, device=reference.device if reference is not None else "cpu")
        was = self.network.training
        try:
            self.network.eval()
            with torch.no_grad():
                out = self.network(x)
        except Exception as err:  # noqa: BLE001 - any failure of the user's network on this input
            raise ConfigError(f"{self.ref.describe()} fails on an input of shape {' x '.join(map(str, want_in))} "
                              f"({type(err).__name__}: {err}); choose a --crop it accepts (e.g. multiples of 16 or 32) "
                              "or fix --net-args.") from err
        finally:
            self.network.train(was)
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        if shape != want_out:
            got = " x ".join(map(str, shape)) if shape is not None else f"a {type(out).__name__}"
            raise ConfigError(
                f"{self.ref.describe()} maps {' x '.join(map(str, want_in))} to {got}; autopeft fine-tunes image-to-image "
                f"networks only: {' x '.join(map(str, want_out))} (one output channel of the input's size, or what "
                "--in-channels/--out-channels say). Set the network's output channels (e.g. \"out_channels\": 1) or turn "
                "deep supervision off."
            )


def registered_ref(backbone: str, preset: str) -> NetworkRef | None:
    """The reference registered as ``backbone``/``preset``, or None for a registered backbone."""
    base._load_builtin()
    entry = base._REGISTRY.get(backbone)
    refs = getattr(entry[0], "refs", None) if entry else None
    return refs.get(preset) if refs else None


def register_network(ref: NetworkRef) -> tuple[str, str]:
    """Register ``ref`` (idempotent) in this process and in ``$AUTOPEFT_NETWORKS`` for the processes
    it starts; returns the ``(backbone, preset)`` names to build it with."""
    _register(ref)
    known = _env_refs()
    if ref.to_json() not in known:
        os.environ[NETWORKS_ENV] = json.dumps(known + [ref.to_json()])
    return ref.name, ref.preset_name


def _register(ref: NetworkRef) -> None:
    entry = base._REGISTRY.get(ref.name)
    if entry is None:
        refs: dict[str, NetworkRef] = {}

        def factory(preset: Preset) -> Backbone:
            return NetworkBackbone(preset, refs[preset.name])

        factory.refs = refs  # type: ignore[attr-defined]
        base._REGISTRY[ref.name] = (factory, {})
        entry = base._REGISTRY[ref.name]
    factory, presets = entry
    refs = getattr(factory, "refs", None)
    if refs is None:
        raise ConfigError(f"{ref.name!r} is already a registered backbone, not a network reference.")
    refs[ref.preset_name] = ref
    presets[ref.preset_name] = ref.preset()


def _env_refs() -> list[str]:
    raw = os.environ.get(NETWORKS_ENV, "")
    if not raw:
        return []
    try:
        items = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"${NETWORKS_ENV} is not valid JSON ({err}); unset it.") from err
    return [item if isinstance(item, str) else json.dumps(item) for item in items]


def load_networks() -> None:
    """Register every reference ``$AUTOPEFT_NETWORKS`` holds (every process, before a look-up)."""
    for text in _env_refs():
        ref = NetworkRef.from_json(text)
        entry = base._REGISTRY.get(ref.name)
        if entry is None or ref.preset_name not in entry[1]:
            _register(ref)


def save_run_network(run_dir: str | os.PathLike, backbone: str, preset: str) -> None:
    """Write the reference of ``backbone``/``preset`` into a run directory (``network.json``) when
    it is a user's network, so that whatever reads the run later (predict, export, report, resume)
    rebuilds it; nothing for a registered backbone."""
    ref = registered_ref(backbone, preset)
    if ref is None:
        return
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / RUN_FILE, json.dumps(json.loads(ref.to_json()), indent=2) + "\n", inside=run_dir)


def load_run_network(run_dir: str | os.PathLike) -> tuple[str, str] | None:
    """Register the network a run directory names (``network.json``), if any; its names.

    The file is the run's own record of the ``--backbone`` its search was given: building it runs
    what that reference names (a ``module:Class`` import, a bundle's ``network_def``), as the
    search did.
    """
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        ref = NetworkRef.from_json(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, TypeError) as err:
        raise ConfigError(f"{path}: not a network reference autopeft wrote ({err}).") from err
    return register_network(ref)
