"""Show a search space: its groups and choices, its size, the range of trainable parameters, and
sampled plans with their share of parameters, without training anything.

A space (search_spaces/<backbone>.yaml) gives, per group of sites, the PEFT methods that may sit
there (none included) with their hyperparameter choices, plus the BitFit toggle, the learning rate
and SH-PEFT's lambda. The budget is a hard limit: a plan over it never trains.

budgets:
  1%        a percentage of the pre-trained network's parameters
  0.005     a fraction
  250k      a parameter count (also 1.5M, 12000)

examples:
  autopeft space --backbone unetr --budget 1%
  autopeft space --backbone cvtgan --budget 0.5% --sample 10 --preset paper
  autopeft space --backbone monai:BasicUNet --net-args '{"features": [8, 8, 16, 16, 32, 8]}' --budget 1%
  autopeft space --backbone monai:BasicUNet --net-args net.json --space auto-blocks --budget 1%
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    from autopeft.cli._common import add_network_arguments

    parser.add_argument("--backbone", required=True, help="registered backbone (see 'autopeft backbones'), or your own "
                        "network: monai:NAME, bundle:DIR, module.path:Class (see below)")
    parser.add_argument("--budget", default="1%", help="parameter budget: 1%%, 0.005 or 250k")
    parser.add_argument("--preset", default="tiny", help="backbone preset the counts are for")
    parser.add_argument("--space", default=None, help="a shipped space name, a space YAML file, or a space generated from "
                        "the sites: auto-grouped (one group per role x kind x stage) or auto-blocks (one per site) "
                        "(default: the shipped one for the backbone, else auto-grouped)")
    parser.add_argument("--sample", type=int, default=5, metavar="N", help="how many random plans to show")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled plans")
    add_network_arguments(parser, schedule=False)


def run(args: argparse.Namespace) -> int:
    import optuna

    from autopeft.cli._flags import flag_errors
    from autopeft.errors import ConfigError
    from autopeft.search import Budget, PlanCounter, load_space, space_files
    from autopeft.report import plan_summary
    from autopeft.backbones import build_backbone

    if args.sample < 0:
        raise ConfigError(f"--sample must be >= 0, but got {args.sample}.")
    with flag_errors({"budget": "--budget"}):
        budget = Budget.parse(args.budget)
    from autopeft.cli._common import resolve_backbone
    from autopeft.search.auto_space import AUTO_SPACES

    args.backbone, args.preset = resolve_backbone(args)
    template = build_backbone(args.backbone, args.preset)
    space = load_space(args.space or args.backbone, template.sites(), model=template)
    if space.backbone != args.backbone:
        raise ConfigError(f"--space {args.space} is written for {space.backbone!r}, not {args.backbone!r}.")
    counter = PlanCounter(template)
    print(space.describe())
    for note in space.notes:
        print(f"  left out: {note}")
    size, note = space.size()
    print(f"\nsize: {note or f'{size:,.0f} plans'}")
    if space.notes or (args.space or args.backbone) in AUTO_SPACES or args.backbone not in space_files():
        for style in AUTO_SPACES:
            other, other_note = load_space(style, template.sites(), model=template).size()
            print(f"  {style}: {other_note or f'{other:,.0f} plans'} ({len(template.sites())} sites)")
    low, high = _extremes(space, counter)
    limit = budget.limit(counter.total)
    print(f"trainable: {100 * low.fraction:.4f}% to {100 * high.fraction:.3f}% of {counter.total:,} parameters "
          f"({args.backbone}/{args.preset}); budget {budget.describe(counter.total)}")
    if args.sample:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
        print(f"\n{args.sample} sampled plans:")
        feasible = 0
        for _ in range(args.sample):
            plan = space.suggest(study.ask())
            count = counter.count(plan)
            ok = count.trainable <= limit
            feasible += ok
            print(f"  {100 * count.fraction:8.4f}%  {'ok  ' if ok else 'OVER'}  {plan_summary(plan.to_dict())}")
        print(f"{feasible} of {args.sample} within the budget")
    return 0


def _extremes(space, counter):
    """Counts of the smallest and largest plans: per group its smallest (largest) choice, BitFit
    off (on). Counts add up over groups, so these are the space's extremes."""
    from autopeft.search.budget import PlanCount

    small, large = {}, {}
    for group in space.groups:
        counted = []
        for method, values in space.group_choices(group):
            plan = space.plan_from_params(space.params_for({group.name: (method, values), "bitfit": False}))
            counted.append((counter.count(plan).trainable, (method, values)))
        small[group.name] = min(counted, key=lambda item: item[0])[1]
        large[group.name] = max(counted, key=lambda item: item[0])[1]
    bits = space.bitfit.discrete_values()
    low = counter.count(space.plan_from_params(space.params_for({**small, "bitfit": False if False in bits else bits[0]})))
    high = counter.count(space.plan_from_params(space.params_for({**large, "bitfit": True if True in bits else bits[0]})))
    return low, high if isinstance(high, PlanCount) else high
