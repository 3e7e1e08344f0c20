"""A PEFT method added from outside autopeft: this one file and one registry call, no edit elsewhere.

``NormShift`` trains the shifts of a site's norm layers (and their scales when asked). It uses the
capabilities a method declares instead of being named anywhere in autopeft: a space-only
parameter (``part``), the fields a plan summary shows, and nothing else. It goes through a search
space, a real search (Ray Tune + Optuna, 2 CPUs) and the report. Ray workers are other processes:
they find it through ``AUTOPEFT_PLUGINS``, as a third-party method would reach them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from torch import nn

from autopeft.peft import MethodConfig, PeftMethod, register_method, registered_methods

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


@dataclass(frozen=True)
class NormShiftConfig(MethodConfig):
    """Train the norm layers' shifts (biases), and their scales too with ``scales``."""

    scales: bool = field(default=False, metadata={"help": "also train the norms' scales (weights)."})
    label: str = field(default="", metadata={"help": "free text; plan summaries leave it out."})


class NormShift(PeftMethod):
    name = "normshift"
    site_kinds = ("vit", "cnn")
    config_class = NormShiftConfig
    mergeable = True  # norm parameters are plain weights
    space_params = ("part",)  # a space says part: shift | affine
    summary_fields = ("scales",)

    def from_space(self, values, sites):
        values = dict(values)
        part = values.pop("part", None)
        if part is not None:
            values["scales"] = part == "affine"
        return values

    def inject(self, site, config: NormShiftConfig, context) -> list[nn.Parameter]:
        wanted = ("bias", "weight") if config.scales else ("bias",)
        return [p for m in site.module.modules() if isinstance(m, _NORMS)
                for name, p in m.named_parameters(recurse=False) if name in wanted]


def _register() -> None:
    register_method(NormShift)  # the one registry call


# Imported as a plug-in (a Ray worker, through AUTOPEFT_PLUGINS): registered at import, as a
# third-party module would be. In the test process the fixture registers it into a copy of the
# registry instead, so that the rest of the suite sees the built-in methods only.
if os.environ.get("AUTOPEFT_PLUGINS") == __name__:
    _register()

SPACE = """
backbone: cvtgan
groups:
  encoder.vit:
    sites: "encoder.*.block*"
    methods:
      none: {}
      normshift: {part: [shift, affine], label: test}
  decoder.vit:
    sites: "decoder.*.block*"
    methods:
      normshift: {part: [shift, affine]}
bitfit: [false]
lr: 2.0e-3
"""
PROTOCOL = {"pretrain_train": 2, "pretrain_val": 1, "finetune_train": 1, "finetune_val": 1, "finetune_test": 1, "folds": 1}


@pytest.fixture(scope="module", autouse=True)
def _plugin_in_every_process():
    # Autouse, so before ray_session starts Ray: its workers inherit this environment and import
    # this module under the name pytest gave it, from the folder that makes that name importable.
    import autopeft.peft.base as peft_base

    builtin = dict(registered_methods())
    root = Path(__file__).resolve().parents[len(__name__.split(".")) - 1]
    saved = {k: os.environ.get(k) for k in ("AUTOPEFT_PLUGINS", "PYTHONPATH")}
    os.environ["AUTOPEFT_PLUGINS"] = __name__
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), saved["PYTHONPATH"]]))
    assert sys.modules[__name__]  # loading the plug-ins here imports nothing (again)
    _register()
    yield
    peft_base._REGISTRY.clear()
    peft_base._REGISTRY.update(builtin)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def space_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("space") / "normshift.yaml"
    path.write_text(SPACE, encoding="utf-8")
    return path


def test_the_space_draws_the_method_through_its_own_parameters(space_file):
    from autopeft.peft import apply_plan
    from autopeft.search.budget import PlanCounter
    from autopeft.search.space import load_space
    from autopeft.backbones import build_backbone

    model = build_backbone("cvtgan", "tiny")
    space = load_space(space_file, model.sites())
    assert "normshift" in space.describe() and space.size()[0] == (2 + 1) * 2
    plan = space.plan_from_params({"encoder.vit.method": "normshift", "encoder.vit.normshift.part": "affine",
                                   "decoder.vit.normshift.part": "shift"})
    assert plan.sites["encoder.*.block*"].to_dict() == {"method": "normshift", "scales": True, "label": "test"}
    assert plan.sites["decoder.*.block*"].to_dict() == {"method": "normshift", "scales": False, "label": ""}
    frozen = space.plan_from_params({"encoder.vit.method": "none", "decoder.vit.normshift.part": "shift"})
    assert list(frozen.sites) == ["decoder.*.block*"]  # a method that trains nothing adds no entry

    apply_plan(model, plan)
    # Exactly the vit sites' norms: scales and shifts in the encoder, shifts in the decoder.
    names = {id(p): n for n, p in model.net.named_parameters()}
    expected = {names[id(p)] for site in model.sites() if site.kind == "vit"
                for m in site.module.modules() if isinstance(m, _NORMS)
                for k, p in m.named_parameters(recurse=False) if k == "bias" or site.role == "encoder"}
    assert expected and {n for n, p in model.net.named_parameters() if p.requires_grad} == expected
    counter = PlanCounter(build_backbone("cvtgan", "tiny"))
    assert counter.count(plan).trainable == sum(p.numel() for p in model.net.parameters() if p.requires_grad)


@pytest.mark.slow  # Ray Tune, training
def test_a_search_and_its_report_run_the_method(ray_session, space_file, tmp_path):
    from _fakes import make_dataset
    from autopeft.report import write_report
    from autopeft.report import SearchOutputs
    from autopeft.runner import run_search
    from autopeft.search.config import SearchConfig
    from autopeft.runs import FINISHED, records

    data = make_dataset(tmp_path / "data", {"1": 3, "2": 3}, shape=(20, 18, 16), long_factor=1.5)
    run_dir = run_search(SearchConfig(
        backbone="cvtgan", budget="5%", preset="tiny", space=str(space_file), scanners=["1", "2"], trials=2, epochs=1,
        data=str(data), out=str(tmp_path / "run"), pretrain_epochs=1, protocol=PROTOCOL, cpus_per_trial=1,
        concurrency=2, device="cpu", references=False, portfolio=False, progress=False, confirm=0, priors=False,
        asha=False), outputs=SearchOutputs())
    rows = records(run_dir)
    assert [r["state"] for r in rows] == [FINISHED, FINISHED], [r.get("reason") for r in rows]
    assert all(spec["method"] == "normshift" for r in rows for spec in r["plan"]["sites"].values())
    csv = (run_dir / "results.csv").read_text(encoding="utf-8")
    assert "decoder.*.block*=normshift(scales=" in csv and "label=" not in csv
    html = write_report(run_dir, slices=False).read_text(encoding="utf-8")
    assert "normshift(scales=" in html
