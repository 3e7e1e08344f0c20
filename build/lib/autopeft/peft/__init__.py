"""Parameter-efficient fine-tuning of 3D encoder-decoders, driven by plans.

>>> from autopeft.peft import Plan, apply_plan, count_trainable, trainable_fraction
>>> plan = Plan.from_dict({"backbone": "unetr", "bitfit": True,
...                        "sites": {"encoder.*": {"method": "lora", "rank": 4, "targets": ["q", "k"]}}})
>>> model = apply_plan(build_backbone("unetr", "tiny"), plan)   # doctest: +SKIP

Methods (one module each, registered by name): ``none``, ``full``, ``bitfit``, ``layernorm``,
``lora``, ``adapter``, ``ssf``, ``vpt``, ``shpeft``. :func:`registered_methods` lists them with
the site kinds they fit and their config classes.
"""

from autopeft.peft.apply import PeftState, apply_plan, count_trainable, merge_plan, plan_state, trainable_fraction
from autopeft.peft.base import MethodConfig, PeftMethod, get_method, register_method, registered_methods
from autopeft.peft.checkpoint import load_trained, save_trained
from autopeft.peft.plan import Plan, SiteSpec, load_plan, named_plans

__all__ = [
    "Plan",
    "SiteSpec",
    "load_plan",
    "named_plans",
    "apply_plan",
    "merge_plan",
    "count_trainable",
    "trainable_fraction",
    "plan_state",
    "PeftState",
    "save_trained",
    "load_trained",
    "PeftMethod",
    "MethodConfig",
    "register_method",
    "registered_methods",
    "get_method",
]
