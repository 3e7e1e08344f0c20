"""Replays the engine's search on a lab table, for many sampler seeds, at no training cost.

A lab table (``bench/table.py``) holds hundreds of plans trained once on one scenario, with their
validation learning curves and test scores. A replay runs the engine's own search logic on it,
sequentially (concurrency 1: each trial ends before the next is proposed, so cost order is exact):

- an in-memory Optuna study with the engine's sampler (``sampler.make_sampler``, seeded as a
  first session), the baseline portfolio enqueued first (``portfolio.enqueue_portfolio``), and with
  a prior the warm start (``_plans.warm_start``) and ``priors.PriorGuide`` at the variant's fading
  ``beta``;
- proposals through the engine's ``_searcher.StudySearcher`` (its ``suggest`` / ``on_trial_result``
  / ``on_trial_complete``): the define-by-run step ``_plans.plan_definer``, over-budget draws
  redrawn and told PRUNED, a stopped trial told PRUNED with its intermediate values, exactly as a
  search does;
- fidelity: Ray's ``ASHAScheduler`` built by ``_tune.scheduler_for`` (grace max(1, E // 4),
  reduction factor 2, time attribute pair-epochs), driven through its public ``on_trial_add`` /
  ``on_trial_result`` / ``on_trial_complete`` with the recorded learning curves; the trial reports
  where a search's trial reports (the rungs inside a pair, and each pair's end);
- a proposed plan found in the table (by plan id, fine-tuning seed 0) uses its recorded curves
  and test scores; any other plan a **surrogate** (scikit-learn random forest on plan features)
  fitted on the table, gains floored at ``SURROGATE_FLOOR_DB`` (a diverged plan's depth would set
  its neighbours' predictions), whose K-fold R2 and Spearman are reported: on every plan, on those
  above the floor, and within the top quarter (where a search's choices are made).

Cost is fine-tuning pair-epochs; every run has the same horizon, ``replay.horizon_trials`` x pairs
x E (bench/scenarios.yaml), and a variant with a prior pays the prior's own cost (from the
table's ``-priors.json``) at the start. Regret is read against the table's best feasible plan, by
test gain (reported) and by validation gain (the declared rule decides on it); the best so far
is the run's best FINISHED plan by validation gain. Per run: the final regret and the regret area
(mean regret over the horizon).

Variants: ``no-priors`` (TPE + portfolio), ``random``, every prior signal
(``options.PRIOR_SIGNALS``) at each declared fading strength beta (``<signal>-bh/10``, ``-bh/3``,
``-bh``: horizon / 10, horizon / 3 and the horizon in trials), and controls: ``oracle-bh/10`` ..
(the table's validation gain + Gaussian noise of the measured seed-to-seed SD, robust to one
diverged seed), and at beta
horizon / 3 ``inverted-<signal>`` (``priors.InvertedPrior``) and ``permuted-<signal>``
(``priors.PermutedPrior``, its per-site or per-candidate values shuffled with the sampler seed; a
signal whose prior has none, ``count``, has no permuted variant, and the output's
``skipped_variants`` says why). Paired by sampler seed against ``no-priors``: mean difference with its
t 95% interval and a BCa bootstrap interval, per scenario; ``--pooled`` pools the lab scenarios
as ``decisions.prior_default`` says and prints the decision. Also the declared signal-quality
figures (``autopeft.search.prior_quality.quality``: top-10 recall, NDCG@10, Spearman, Spearman
partialled on log trainable count, each with its bootstrap 95% CI, beside the noise ceiling).

    python bench/replay.py --scenario cvtgan-3-5-d3                 # -> bench/results/replay-cvtgan-3-5-d3.json
    python bench/replay.py --pooled                                 # the lab scenarios pooled -> bench/results/replay.json
    python bench/replay.py --scenario cvtgan-1-5 --tables /tmp/lab --seeds 4 --variants no-priors,random --out /tmp/r.json

Seeds run on two processes (``--workers``). Needs the scenario's cached source models, importance
maps and candidate scores for the prior signals (``bench/table.py --priors`` computes them).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _lab import BASELINE, RESULTS, TABLES, code_version, curve_columns, declared_betas, load_declared, machine, plan_id  # noqa: E402
from _lab import paired, variant_list  # noqa: E402
from _lab import scenario as declared_scenario  # noqa: E402

KFOLDS = 5
QUALITY_TOP = 10  # decisions.signal_quality: top-10 recall and NDCG@10


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default=None, help="a declared scenario whose table exists (bench/table.py).")
    parser.add_argument("--pooled", action="store_true", help="pool the lab scenarios' replay files and apply the rule.")
    parser.add_argument("--tables", type=Path, default=TABLES, help=f"folder of the tables. Default: {TABLES}.")
    parser.add_argument("--space", default="grouped", choices=("grouped", "blocks"), help="the space searched. Default: grouped.")
    parser.add_argument("--seeds", type=int, default=None, help="sampler seeds 0 .. n-1 per variant. Default: the declared replay.seeds.")
    parser.add_argument("--variants", default=None, help="comma-separated variant names. Default: every variant.")
    parser.add_argument("--workers", type=int, default=2, help="processes the seeds run on. Default: 2.")
    parser.add_argument("--work", type=Path, default=RESULTS / "replay-work", help="finished runs, kept for a rerun "
                        "after an interruption. Default: bench/results/replay-work.")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where --pooled reads replay-<scenario>.json. "
                        "Default: bench/results.")
    parser.add_argument("--out", type=Path, default=None, help="JSON output. Default: bench/results/replay-<scenario>.json "
                        "(replay.json with --pooled).")
    args = parser.parse_args(argv)
    if args.pooled == (args.scenario is not None):
        parser.error("give --scenario NAME or --pooled.")
    if args.seeds is not None and args.seeds < 2:
        parser.error(f"--seeds must be at least 2 (paired intervals), but got {args.seeds}.")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, but got {args.workers}.")
    return args


# Pure parts (tested): regret, intervals, the rule, signal quality ---------------------------------
def regret_curve(events: Sequence[dict[str, Any]], reference: float, key: str) -> list[tuple[float, float]]:
    """(cost, regret) steps of a run: regret = ``reference`` minus the ``key`` gain of the best
    FINISHED plan by validation gain so far (No-FT, gain 0, before any); a trial's cost is spent
    before its plan counts."""
    steps, best = [(0.0, reference)], None
    for e in events:
        if e["state"] == "FINISHED" and (best is None or e["val_gain"] > best["val_gain"]):
            best = e
            steps.append((float(e["cost"]), reference - float(e[key])))
    return steps


def regret_at(steps: Sequence[tuple[float, float]], cost: float) -> float:
    value = steps[0][1]
    for at, regret in steps:
        if at <= cost:
            value = regret
    return value


def regret_area(steps: Sequence[tuple[float, float]], horizon: float) -> float:
    """Mean regret over pair-epochs 0 .. ``horizon`` of a step function (steps past it ignored)."""
    area, (previous_cost, previous) = 0.0, steps[0]
    for cost, regret in steps[1:]:
        if cost >= horizon:
            break
        area += (cost - previous_cost) * previous
        previous_cost, previous = cost, regret
    return (area + (horizon - previous_cost) * previous) / horizon


def decide(per_scenario: dict[str, dict[str, list[float]]], candidates: Sequence[str], *, baseline: str = BASELINE,
           oracle: str | None = None, controls: Sequence[str] = (), slow: float = 0.10) -> dict[str, Any]:
    """The declared ``decisions.prior_default`` rule on validation regret areas.

    ``per_scenario[scenario][variant]``: the areas per sampler seed (seed i at index i). Per
    scenario each variant's paired differences against ``baseline`` are divided by the baseline's
    mean area there, then pooled over scenarios. A variant qualifies when the pooled t 95% interval
    lies entirely below 0 and no scenario's own t interval lies entirely above 0; the default is
    the qualifying candidate with the lowest pooled mean, else priors OFF. ``oracle`` must qualify
    (else the prior's injection is broken); a control whose pooled mean is worse than +``slow``
    marks the fading as too slow."""
    def judge(variant: str) -> dict[str, Any]:
        pooled, scenario_ci = [], {}
        for name, areas in per_scenario.items():
            if variant not in areas or baseline not in areas:
                continue
            base = np.asarray(areas[baseline], dtype=float)
            diff = np.asarray(areas[variant], dtype=float) - base
            scale = float(base.mean()) or 1.0
            scenario_ci[name] = paired(diff)
            pooled.extend((diff / scale).tolist())
        if len(pooled) < 2:
            return {"qualifies": False, "pooled": None, "scenarios": scenario_ci}
        summary = paired(pooled)
        above = [n for n, s in scenario_ci.items() if s["t_ci"][0] > 0]
        return {"qualifies": summary["t_ci"][1] < 0 and not above, "pooled": summary, "scenarios": scenario_ci,
                "scenarios_above_zero": above}

    verdicts = {v: judge(v) for v in [*candidates, *([oracle] if oracle else []), *controls]}
    qualifying = [v for v in candidates if verdicts[v]["qualifies"]]
    default = min(qualifying, key=lambda v: verdicts[v]["pooled"]["mean"]) if qualifying else None
    result = {"variants": verdicts, "qualifying": qualifying, "default": default or "priors off",
              "text": (f"default: {default} (pooled normalised regret-area difference "
                       f"{verdicts[default]['pooled']['mean']:+.3f})" if default else
                       "no variant qualifies: priors stay OFF by default")}
    if oracle:
        result["oracle_qualifies"] = verdicts[oracle]["qualifies"]
        if not verdicts[oracle]["qualifies"]:
            result["text"] += "; the noisy ORACLE does not qualify: the prior's injection is broken, fix it before deciding"
    result["fading_too_slow"] = [c for c in controls if verdicts[c]["pooled"] and verdicts[c]["pooled"]["mean"] > slow]
    return result


def quality_figures(scores: Sequence[float], gains: Sequence[float], log_counts: Sequence[float], *,
                    top: int = QUALITY_TOP) -> dict[str, Any]:
    """``prior_quality.quality`` of a signal's scores against the plans' gains (size: log trainable
    count), as JSON: per metric its value, the bootstrap 95% CI's low and high, and the CI's method.
    With ``top`` plans or fewer (a quick table) k is one less than their number, and ``k`` says so:
    BCa's jackknife scores the metric on every set of all plans but one, where top-k needs k plans."""
    from autopeft.search.prior_quality import quality

    k = max(1, min(top, len(scores) - 1))
    figures = quality(scores, gains, log_counts, k=k)
    return {"k": k, **{name: {"value": e.value, "low": e.low, "high": e.high, "method": e.method}
                       for name, e in figures.items()}}


# The table and the surrogate ---------------------------------------------------------------------
class Table:
    """A lab table read back: per plan (fine-tuning seed 0) the pairs' validation gain curves
    (pairs x E) and test gains, in the order the engine trains the pairs."""

    def __init__(self, folder: Path, name: str) -> None:
        import pandas as pd

        self.path = folder / f"{name}.csv.gz"
        meta_path = folder / f"{name}.json"
        if not self.path.is_file() or not meta_path.is_file():
            raise SystemExit(f"no table for {name} in {folder}: build it with `python bench/table.py --scenario {name}` "
                             "(or point --tables at its folder).")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        self.epochs = int(self.meta["epochs"])
        self.pairs = [tuple(p.split("->")) for p in self.meta["settings"]["pairs"]]
        frame = pd.read_csv(self.path, dtype={"source": str, "target": str, "plan_id": str, "error": str, "space": str})
        frame["error"] = frame["error"].fillna("")
        frame["space"] = frame["space"].fillna("")
        self.frame = frame
        curve = curve_columns(self.epochs)
        self.plans: dict[str, dict[str, Any]] = {}
        for pid, rows in frame[frame["seed"] == 0].groupby("plan_id", sort=False):
            rows = rows.set_index(["source", "target"]).reindex(self.pairs)
            failed = rows["error"].fillna("missing").ne("").to_numpy()
            first = rows.iloc[0]
            self.plans[pid] = {
                "plan": json.loads(first["plan"]), "kind": first["kind"], "label": first["label"], "space": first["space"],
                "trainable": int(first["trainable"]), "fraction": float(first["fraction"]), "feasible": bool(first["feasible"]),
                "val": rows[curve].to_numpy(float) - rows[["noft_val"]].to_numpy(float),
                "test": rows["test_gain"].to_numpy(float), "failed": failed}
        ok = {pid: p for pid, p in self.plans.items() if not p["failed"].any()}
        feasible = {pid: p for pid, p in ok.items() if p["feasible"]}
        self.best_val = max(feasible, key=lambda pid: feasible[pid]["val"][:, -1].mean())
        self.best_test = max(feasible, key=lambda pid: feasible[pid]["test"].mean())
        self.reference = {"val": float(feasible[self.best_val]["val"][:, -1].mean()),
                          "test": float(feasible[self.best_test]["test"].mean())}
        self.noise_sd_plain = float("nan")
        self.noise_sd, self.noise_ceiling, self.second_seed_plans = self._noise()

    def _noise(self) -> tuple[float, float, int]:
        """Seed-to-seed SD of a plan's validation gain (mean over pairs), from the plans trained
        with fine-tuning seeds 0 and 1: a robust SD of their differences / sqrt(2); and the Spearman
        of their gains between the two seeds (the noise ceiling).

        Robust (scipy's median absolute deviation, scaled to an SD): one plan that diverges under one
        seed and not the other (tens of dB) would otherwise set the SD of every plan; the plain SD is
        kept beside it (``noise_sd_plain``)."""
        from scipy.stats import median_abs_deviation, spearmanr

        f = self.frame[self.frame["error"] == ""]
        per = f.groupby(["plan_id", "seed"])["val_gain"].mean().unstack()
        if 1 not in per.columns:
            return float("nan"), float("nan"), 0
        both = per.dropna(subset=[0, 1])
        if len(both) < 3:
            return float("nan"), float("nan"), int(len(both))
        differences = (both[0] - both[1]).to_numpy()
        self.noise_sd_plain = float(differences.std(ddof=1) / math.sqrt(2))
        sd = float(median_abs_deviation(differences, scale="normal") / math.sqrt(2))
        return sd, float(spearmanr(both[0], both[1]).statistic), int(len(both))


class PlanFeatures:
    """Plan -> features for the surrogate: per group of the grouped space the share of its sites
    each method holds and the mean log of rank / reduction factor / tokens / fraction there; BitFit,
    Full-FT, log learning rate, SH-PEFT's lambda and log trainable count."""

    NUMERIC = ("rank", "reduction_factor", "tokens", "fraction", "count")

    def __init__(self, template, space, counter) -> None:
        from autopeft.peft import registered_methods

        self.sites = [s.name for s in template.sites()]
        self.group_of = {}
        for group in space.groups:
            for info in group.sites:
                self.group_of[info.name] = group.name
        self.groups = sorted(set(self.group_of.values()) | {"other"})
        self.methods = sorted(registered_methods())
        self.counter = counter
        self.names = ([f"{g}:{m}" for g in self.groups for m in self.methods]
                      + [f"{g}:log_{k}" for g in self.groups for k in self.NUMERIC]
                      + ["bitfit", "full_ft", "log_lr", "shpeft_lambda", "log_trainable"])

    def __call__(self, plan) -> np.ndarray:
        import fnmatch

        share: dict[str, float] = {}
        numeric: dict[str, list[float]] = {}
        size: dict[str, int] = {}
        for site in self.sites:
            group = self.group_of.get(site, "other")
            size[group] = size.get(group, 0) + 1
            for pattern, spec in plan.sites.items():  # the first matching pattern, as apply_plan reads it
                if fnmatch.fnmatchcase(site, pattern):
                    entry = spec.to_dict()
                    share[f"{group}:{entry['method']}"] = share.get(f"{group}:{entry['method']}", 0) + 1
                    for k in self.NUMERIC:
                        if isinstance(entry.get(k), (int, float)) and entry.get(k) is not None:
                            numeric.setdefault(f"{group}:log_{k}", []).append(math.log1p(float(entry[k]) * (1e4 if k == "fraction" else 1)))
                    break
        values = {k: v / size[k.split(":")[0]] for k, v in share.items()}
        values.update({k: float(np.mean(v)) for k, v in numeric.items()})
        lr = float(plan.train.get("lr", 0) or 0)
        values.update(bitfit=float(bool(plan.bitfit)), full_ft=float(bool(plan.full_ft)),
                      log_lr=math.log10(lr) if lr > 0 else -6.0, shpeft_lambda=float(plan.train.get("shpeft_lambda", -1.0)),
                      log_trainable=math.log10(1 + self.counter.count(plan).trainable))
        return np.array([values.get(n, 0.0) for n in self.names], dtype=float)


# Gains below this (dB under No-FT) are fitted as this: to a search, a plan this far below doing
# nothing has failed, and how far it fell (a diverged plan: tens of dB) says nothing about its
# neighbours. Fitted raw, the few diverged plans of a table set the leaves of the plans around them
# and the forest's predictions for ordinary plans fall well below their truth. Set before looking at
# any replay; the cross-validation reports both scales. Recorded values (plans in the table) are
# used as they are.
SURROGATE_FLOOR_DB = -1.0


class Surrogate:
    """A random forest (scikit-learn) from plan features to every pair's validation gain after
    each epoch and its test gain (one multi-output model), fitted on the table's plans, their
    gains floored at :data:`SURROGATE_FLOOR_DB`."""

    def __init__(self, table: Table, features: PlanFeatures, *, seed: int = 0) -> None:
        from autopeft.peft import Plan

        self.table, self.features, self.seed = table, features, seed
        usable = [pid for pid, p in table.plans.items() if not p["failed"].any()]
        self.ids = usable
        self.X = np.stack([features(Plan.from_dict(table.plans[pid]["plan"])) for pid in usable])
        self.Y = np.stack([np.concatenate([table.plans[pid]["val"].ravel(), table.plans[pid]["test"]]) for pid in usable])
        self.model = self._fit(self.X, np.maximum(self.Y, SURROGATE_FLOOR_DB))
        self._predictions: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _fit(self, X, Y):
        from sklearn.ensemble import RandomForestRegressor

        # A forest: no scaling to tune, multi-output in one model, and honest about plans unlike
        # any in the table (it predicts the mean of the nearest leaves, never extrapolates wildly).
        return RandomForestRegressor(n_estimators=200, min_samples_leaf=2, random_state=self.seed, n_jobs=1).fit(X, Y)

    def split(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pairs, epochs = len(self.table.pairs), self.table.epochs
        return y[: pairs * epochs].reshape(pairs, epochs), y[pairs * epochs:]

    def predict(self, plan) -> tuple[np.ndarray, np.ndarray]:
        """(validation curves pairs x E, test gains) of ``plan``; kept per plan, as the forest is
        fixed and a replayed search proposes some plans again."""
        key = plan.key()
        if key not in self._predictions:
            self._predictions[key] = self.split(self.model.predict(self.features(plan)[None, :])[0])
        return self._predictions[key]

    def cross_validate(self, k: int = KFOLDS) -> dict[str, Any]:
        """Held-out R2 and Spearman on a K-fold split of the table's plans (as YAHPO reports its
        surrogates): of the final validation gain and the test gain (means over pairs), and R2
        over every output."""
        from scipy.stats import spearmanr
        from sklearn.metrics import r2_score
        from sklearn.model_selection import KFold

        k = min(k, len(self.ids))
        predicted = np.zeros_like(self.Y)
        for train, test in KFold(k, shuffle=True, random_state=self.seed).split(self.X):
            predicted[test] = self._fit(self.X[train], np.maximum(self.Y[train], SURROGATE_FLOOR_DB)).predict(self.X[test])
        pairs, epochs = len(self.table.pairs), self.table.epochs
        last = [p * epochs + epochs - 1 for p in range(pairs)]
        val_true, val_pred = self.Y[:, last].mean(1), predicted[:, last].mean(1)
        test_true, test_pred = self.Y[:, pairs * epochs:].mean(1), predicted[:, pairs * epochs:].mean(1)

        def figures(true: np.ndarray, pred: np.ndarray, rows: np.ndarray) -> dict[str, float]:
            return {"r2": float(r2_score(true[rows], pred[rows])), "spearman": float(spearmanr(true[rows], pred[rows]).statistic)}

        every = np.ones(len(val_true), bool)
        above = val_true > SURROGATE_FLOOR_DB
        top = val_true >= np.quantile(val_true, 0.75)
        return {"folds": k, "plans": len(self.ids), "floor_db": SURROGATE_FLOOR_DB,
                "val_gain": figures(val_true, val_pred, every), "test_gain": figures(test_true, test_pred, every),
                "above_floor": {"plans": int(above.sum()), "val_gain": figures(val_true, val_pred, above),
                                "test_gain": figures(test_true, test_pred, above)},
                "top_quarter_by_val": {"plans": int(top.sum()), "val_gain": figures(val_true, val_pred, top)},
                "all_outputs_r2": float(r2_score(self.Y, predicted))}


# Prior objects for the controls ------------------------------------------------------------------
class OracleSignal:
    """The table's validation gain (mean over pairs; the surrogate's for plans outside it) plus
    Gaussian noise of SD ``sd``, the same draw for the same plan within one run."""

    def __init__(self, table: Table, surrogate: Surrogate, counter, sd: float, seed: int) -> None:
        self.table, self.surrogate, self.counter, self.sd, self.seed = table, surrogate, counter, sd, seed

    def score(self, plan, count=None) -> float:
        pid = plan_id(plan.to_dict())
        known = self.table.plans.get(pid)
        value = float(known["val"][:, -1].mean()) if known is not None and not known["failed"].any() \
            else float(self.surrogate.predict(plan)[0][:, -1].mean())
        noise = np.random.default_rng([self.seed, int(pid, 16)]).normal(0.0, self.sd) if self.sd > 0 else 0.0
        return value + float(noise)


def _shown(path: Path) -> str:
    """A path as the result file records it: relative to the repository when inside it, so the
    committed JSON does not carry this machine's folders."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# One replay run ----------------------------------------------------------------------------------
class Context:
    """Everything a worker needs to replay runs on one table (built once per process)."""

    def __init__(self, tables: Path, name: str, space_name: str, declared: dict[str, Any]) -> None:
        from autopeft.search.budget import Budget, PlanCounter
        from autopeft.search.portfolio import portfolio
        from autopeft.search.space import load_space
        from autopeft.backbones import build_backbone

        self.name, self.tables, self.declared = name, tables, declared
        self.table = Table(tables, name)
        settings = self.table.meta["settings"]
        self.backbone = self.table.meta["scenario"]["backbone"]
        self.template = build_backbone(self.backbone, settings["preset"])
        self.counter = PlanCounter(self.template)
        self.budget = Budget.parse(settings["budget"])
        sites = self.template.sites()
        self.space = load_space(self.backbone if space_name == "grouped" else f"{self.backbone}-blocks", sites)
        self.surrogate = Surrogate(self.table, PlanFeatures(self.template, load_space(self.backbone, sites), self.counter))
        self.train = {"epochs": self.table.epochs}
        self.horizon_trials = int(declared["replay"]["horizon_trials"])
        self.horizon = self.horizon_trials * len(self.table.pairs) * self.table.epochs
        self.baselines = portfolio(self.space, self.counter, self.budget, train=self.train)
        priors_meta = tables / f"{name}-priors.json"
        self.prior_meta = json.loads(priors_meta.read_text(encoding="utf-8")) if priors_meta.is_file() else None
        self._signals: dict[str, Any] = {}
        self._evaluation = None

    def prior_cost(self, prior: str | None) -> float:
        if prior is None or prior == "oracle":
            return 0.0  # the oracle is a control: a prior nobody can pay for
        signal = prior.split(":")[-1]
        if self.prior_meta is None or signal not in self.prior_meta["cost"]:
            raise SystemExit(f"{self.tables / (self.name + '-priors.json')}: no cost of signal {signal!r}; run "
                             f"`python bench/table.py --scenario {self.name} --priors` first.")
        return float(self.prior_meta["cost"][signal]["pair_epochs"])

    def signal(self, name: str):
        """The live prior of a signal on every pair (``table.signal_scorer``: importance maps and
        candidate scores read from the caches ``bench/table.py --priors`` filled)."""
        if name not in self._signals:
            from table import Evaluation, signal_scorer

            if self._evaluation is None:
                spec = self.table.meta["scenario"]
                settings = self.table.meta["settings"]
                self._evaluation = Evaluation(spec, preset=settings["preset"], device="cpu", epochs=self.table.epochs,
                                              budget=settings["budget"], pretrain_epochs=settings.get("pretrain_epochs"),
                                              data_args=settings.get("data"), protocol=settings.get("protocol"))
            ev = self._evaluation
            self._signals[name] = signal_scorer(name, ev.setup, self.template, self.counter, ev.setup.units)
        return self._signals[name]

    def prior(self, prior: str | None, seed: int):
        if prior is None:
            return None
        if prior == "oracle":
            return OracleSignal(self.table, self.surrogate, self.counter, self.table.noise_sd, seed)
        from autopeft.search.priors import InvertedPrior, PermutedPrior

        kind, _, signal = prior.partition(":")
        if not signal:
            return self.signal(kind)
        base = self.signal(signal)
        if kind == "inverted":
            return InvertedPrior(base)
        return PermutedPrior(base, seed)  # each sampler seed its own shuffle

    def outcome(self, plan_dict: dict[str, Any]) -> dict[str, Any]:
        """Validation gain curves (pairs x E), test gains and failures of a plan: recorded, or the
        surrogate's."""
        known = self.table.plans.get(plan_id(plan_dict))
        if known is not None:
            return {"val": known["val"], "test": known["test"], "failed": known["failed"], "source": "table"}
        from autopeft.peft import Plan

        val, test = self.surrogate.predict(Plan.from_dict(plan_dict))
        return {"val": val, "test": test, "failed": np.zeros(len(self.table.pairs), bool), "source": "surrogate"}


def report_times(score_at: Sequence[int], pairs: int, epochs: int) -> list[int]:
    """Pair-epochs at which a search's trial reports: the rungs inside a pair and each pair's end."""
    return sorted(set(score_at) | {k * epochs for k in range(1, pairs + 1)})


def asha_replay(scheduler, trial_id: str, curves: np.ndarray, times: Sequence[int], epochs: int,
                searcher=None) -> tuple[dict[str, Any], int]:
    """One trial's results reported as a search's trial reports them, until ASHA stops it or it
    ends: (last result, pair-epochs run). ``curves``: pairs x E validation gains.

    Ray's ASHAScheduler is driven through its public methods without a live Tune run: it reads
    nothing of the trial but ``trial_id`` (and never the controller), so a stand-in with that one
    field serves; its stop rule, rungs and cutoffs stay Ray's own."""
    from ray.tune.schedulers import TrialScheduler

    pairs = curves.shape[0]
    trial = SimpleNamespace(trial_id=trial_id)
    scheduler.on_trial_add(None, trial)
    result: dict[str, Any] = {}
    for t in times:
        done, epoch = divmod(t, epochs)
        gains = list(curves[:done, -1]) + ([curves[done, epoch - 1]] if epoch else [])
        result = {"gain": float(np.mean(gains)), "epochs_done": int(t), "pairs_done": int(done), "pairs_total": pairs,
                  "fidelity": done / pairs}
        action = scheduler.on_trial_result(None, trial, result)
        if searcher is not None:
            searcher.on_trial_result(trial_id, result)
        if action == TrialScheduler.STOP:
            break
    scheduler.on_trial_complete(None, trial, result)
    return result, int(result["epochs_done"])


def replay_run(ctx: Context, variant: dict[str, Any], seed: int) -> dict[str, Any]:
    """One search replayed: its trials in order with cost, state, gains; regret figures."""
    import optuna

    from autopeft.runs import FINISHED, trial_state
    from autopeft.search._plans import plan_definer, warm_start
    from autopeft.runner._searcher import StudySearcher
    from autopeft.search.sampler import make_sampler
    from autopeft.runner._tune import MAX_INFEASIBLE_DRAWS_PER_TRIAL, scheduler_for
    from autopeft.search.config import SearchConfig
    from autopeft.search.portfolio import enqueue_portfolio
    from autopeft.search.priors import PriorGuide
    from autopeft.runner.trial import TrialSetup

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    table, epochs = ctx.table, ctx.table.epochs
    config = SearchConfig(backbone=ctx.backbone, budget=table.meta["settings"]["budget"], sampler=variant["sampler"],
                          trials=ctx.horizon_trials, sampler_seed=seed, priors=variant["prior"] is not None,
                          epochs=epochs, fidelity="epochs", asha=True)
    session_seed = seed + 1  # a first session's study and guide are seeded sampler seed + session number
    study = optuna.create_study(direction="maximize", sampler=make_sampler(config, session_seed))
    prior = ctx.prior(variant["prior"], seed)
    enqueue_portfolio(study, ctx.baselines)
    guide = None
    if prior is not None:
        warm_start(study, ctx.space, prior, ctx.budget, config, preset_lr=ctx.template.preset.finetune.lr_peft, train=ctx.train)
        guide = PriorGuide(ctx.space, prior, ctx.budget, make_sampler=lambda s: make_sampler(config, s),
                           beta=variant["beta"], candidates=config.prior_candidates, seed=session_seed, train=ctx.train)
    define = plan_definer(ctx.space, ctx.counter, ctx.budget, prior, train=ctx.train, portfolio=ctx.baselines)
    infeasible: list[int] = []
    searcher = StudySearcher(study, define, metric="gain", mode="max",
                             max_infeasible=MAX_INFEASIBLE_DRAWS_PER_TRIAL * ctx.horizon_trials,
                             on_infeasible=lambda c: infeasible.append(c["number"]), guide=guide, step="epochs_done",
                             make_sampler=lambda s: make_sampler(config, s), seed=seed)
    setup = TrialSetup(backbone=ctx.backbone, preset=table.meta["settings"]["preset"], manifest_path="",
                       pairs=tuple(table.pairs), epochs=epochs)
    scheduler, _, setup = scheduler_for(config, setup)
    scheduler.set_search_properties("gain", "max")  # what tune.TuneConfig(metric=, mode=) does in a search
    times = report_times(setup.score_at, len(table.pairs), epochs)
    cost = ctx.prior_cost(variant["prior"])
    events: list[dict[str, Any]] = []
    number = 0
    while cost < ctx.horizon:
        trial_id = f"replay-{number}"
        number += 1
        proposed = searcher.suggest(trial_id)
        if not isinstance(proposed, dict):
            break  # the searcher gave up on over-budget draws
        out = ctx.outcome(proposed["plan"])
        failed_at = int(np.argmax(out["failed"])) if out["failed"].any() else None
        if failed_at is not None:  # a NaN run: the trial fails after that pair, as a search's trial does
            reached = [t for t in times if t <= failed_at * epochs]
            result, spent = (asha_replay(scheduler, trial_id, out["val"], reached, epochs, searcher) if reached
                             else ({"pairs_done": 0, "pairs_total": len(table.pairs)}, 0))
            spent = (failed_at + 1) * epochs
            searcher.on_trial_complete(trial_id, {**result, "error": "NaN"}, error=True)
            state = "FAILED"
        else:
            result, spent = asha_replay(scheduler, trial_id, out["val"], times, epochs, searcher)
            searcher.on_trial_complete(trial_id, result)
            state = trial_state(result, False)
        cost += spent
        events.append({"cost": cost, "state": state, "plan_id": plan_id(proposed["plan"]), "source": out["source"],
                       "portfolio": proposed.get("portfolio"), "spent": spent,
                       "val_gain": float(out["val"][:, -1].mean()), "test_gain": float(out["test"].mean())})
    figures = {}
    for key, reference in (("val", table.reference["val"]), ("test", table.reference["test"])):
        steps = regret_curve(events, reference, f"{key}_gain")
        figures[f"area_{key}"] = regret_area(steps, ctx.horizon)
        figures[f"final_{key}"] = regret_at(steps, ctx.horizon)
    finished = [e for e in events if e["state"] == FINISHED and e["cost"] <= ctx.horizon]
    return {"seed": seed, **figures, "trials": len(events), "finished": len(finished),
            "stopped": sum(e["state"] == "STOPPED" for e in events), "failed": sum(e["state"] == "FAILED" for e in events),
            "infeasible_draws": len(infeasible), "from_surrogate": sum(e["source"] == "surrogate" for e in events),
            "prior_cost": ctx.prior_cost(variant["prior"])}


_CTX: dict[str, Context] = {}


def _worker_init(tables: str, name: str, space: str) -> None:
    import torch

    torch.set_num_threads(1)  # two processes on two cores
    _CTX["ctx"] = Context(Path(tables), name, space, load_declared())


def run_file(work: Path, name: str, seed: int) -> Path:
    """A run's file: the variant's name with ``/`` (the betas' ``-bh/10``) percent-encoded, so that
    every run is one file of the work folder, not a file in a sub-folder named after a prefix."""
    from urllib.parse import quote

    return work / f"{quote(name, safe='')}-s{seed}.json"


def unpermutable(ctx: Context, variants: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The permuted variants whose signal's prior has nothing to permute, with the reason:
    ``priors.PermutedPrior``'s own ConfigError (no signal declares this as a capability, so the
    library's refusal decides, on the live prior; ``count``'s is a bare log count)."""
    from autopeft.errors import ConfigError
    from autopeft.search.priors import PermutedPrior

    skipped = {}
    for name, variant in variants.items():
        kind, _, signal = (variant["prior"] or "").partition(":")
        if kind != "permuted":
            continue
        try:
            PermutedPrior(ctx.signal(signal), 0)
        except ConfigError as error:
            skipped[name] = str(error)
    return skipped


def _work(job: tuple[str, dict[str, Any], int, str]) -> tuple[str, dict[str, Any]]:
    """One run, written atomically to the work folder (a rerun after Ctrl-C skips it)."""
    from autopeft._io import atomic_write_json

    name, variant, seed, work = job
    run = replay_run(_CTX["ctx"], variant, seed)
    atomic_write_json(run_file(Path(work), name, seed), {"variant": variant, **run})
    return name, run


def work_folder(root: Path, ctx: Context, space: str) -> Path:
    """Where a scenario's finished runs are kept: keyed by the table's bytes, the code version and
    the horizon, so that a rerun reuses runs only of the same table, code and settings."""
    import hashlib

    digest = hashlib.sha256(ctx.table.path.read_bytes())
    digest.update(json.dumps([code_version(), ctx.horizon, space, ctx.prior_meta and ctx.prior_meta.get("cost")],
                             default=str).encode("utf-8"))
    return root / f"{ctx.name}-{space}-{digest.hexdigest()[:12]}"


def signal_quality(ctx: Context, signals: Sequence[str]) -> dict[str, Any]:
    """The declared signal_quality figures of each signal on the table's feasible seed-0 plans."""
    import pandas as pd

    path = ctx.tables / f"{ctx.name}-priors.csv.gz"
    if not path.is_file():
        return {"missing": f"{path}: run `python bench/table.py --scenario {ctx.name} --priors`"}
    scores = pd.read_csv(path, dtype={"plan_id": str})
    scores = scores[scores["pair"] == "all"].set_index("plan_id")
    plans = {pid: p for pid, p in ctx.table.plans.items() if p["feasible"] and not p["failed"].any() and p["kind"] != "no-ft"}
    ids = [pid for pid in plans if pid in scores.index]
    val = [plans[pid]["val"][:, -1].mean() for pid in ids]
    test = [plans[pid]["test"].mean() for pid in ids]
    log_count = [math.log10(1 + plans[pid]["trainable"]) for pid in ids]
    out = {"plans": len(ids), "noise_ceiling_spearman": ctx.table.noise_ceiling, "second_seed_plans": ctx.table.second_seed_plans}
    for signal in signals:
        if signal not in scores.columns:
            out[signal] = {"missing": f"no {signal} column in {path}; rerun --priors"}
            continue
        s = scores.loc[ids, signal].to_numpy(float)
        out[signal] = {"val": quality_figures(s, val, log_count), "test": quality_figures(s, test, log_count)}
    return out


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per variant: means of the figures, and paired differences against the baseline."""
    out = {}
    base = {r["seed"]: r for r in runs.get(BASELINE, [])}
    for name, rs in runs.items():
        entry = {k: float(np.mean([r[k] for r in rs])) for k in ("area_val", "area_test", "final_val", "final_test", "trials",
                                                                 "finished", "from_surrogate")}
        if name != BASELINE and base:
            pairs = [(r, base[r["seed"]]) for r in rs if r["seed"] in base]
            entry["vs_" + BASELINE] = {k: paired([a[k] - b[k] for a, b in pairs])
                                       for k in ("area_val", "area_test", "final_val", "final_test")}
        out[name] = entry
    return out


def run_scenario(args: argparse.Namespace, declared: dict[str, Any]) -> dict[str, Any]:
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from autopeft.search.options import PRIOR_SIGNALS

    spec = declared_scenario(args.scenario, declared)
    if spec["role"] == "confirm":
        raise SystemExit(f"{spec['name']} is a `confirm` scenario: never replayed while choosing (bench/scenarios.yaml).")
    wall = time.time()
    ctx = Context(args.tables.expanduser().resolve(), spec["name"], args.space, declared)
    seeds = args.seeds or int(declared["replay"]["seeds"])
    h = ctx.horizon_trials
    variants = variant_list(PRIOR_SIGNALS, declared_betas(h))
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in wanted if v not in variants]
        if unknown:
            raise SystemExit(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(variants)}.")
        variants = {v: variants[v] for v in wanted}
    for variant in variants.values():
        ctx.prior_cost(variant["prior"])  # every prior's cost on record, before any worker starts
    skipped = unpermutable(ctx, variants)
    variants = {name: v for name, v in variants.items() if name not in skipped}
    for name, why in skipped.items():
        print(f"{name}: skipped ({why})", flush=True)
    work = work_folder(args.work, ctx, args.space)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    jobs = []
    for name, variant in variants.items():
        for seed in range(seeds):
            path = run_file(work, name, seed)
            kept = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
            if kept is not None and kept.pop("variant") == json.loads(json.dumps(variant)):
                runs[name].append(kept)
            else:
                jobs.append((name, variant, seed, str(work)))
    print(f"replay {spec['name']} ({spec['role']}), space {args.space}: {len(ctx.table.plans)} plans, E={ctx.table.epochs}, "
          f"{len(ctx.table.pairs)} pairs, horizon {ctx.horizon} pair-epochs ({h} trials); {len(variants)} variants x {seeds} "
          f"seeds on {args.workers} process(es), trials in sequence (concurrency 1); {len(jobs)} runs to do, the rest kept "
          f"in {work}", flush=True)
    started = time.time()
    if jobs:
        pool = ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(str(ctx.tables), spec["name"], args.space))
        try:
            for done, (name, run) in enumerate(pool.map(_work, jobs, chunksize=1), 1):
                runs[name].append(run)
                if done % max(1, len(jobs) // 20) == 0 or done == len(jobs):
                    eta = (time.time() - started) / done * (len(jobs) - done)
                    print(f"  {done}/{len(jobs)} runs; ETA {eta / 60:.1f} min", flush=True)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise SystemExit(f"\ninterrupted: finished runs are kept in {work}; run the same command again to go on.")
        pool.shutdown()
    runs = {name: sorted(rs, key=lambda r: r["seed"]) for name, rs in runs.items()}
    result = {
        "benchmark": "replay", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/replay.py " + " ".join(sys.argv[1:]), "code_version": code_version(), "machine": machine(),
        "scenario": spec, "space": args.space, "table": _shown(ctx.table.path), "table_code_version": ctx.table.meta.get("code_version"),
        "epochs": ctx.table.epochs, "horizon_pair_epochs": ctx.horizon, "horizon_trials": h, "seeds": seeds,
        "concurrency": 1, "betas": declared_betas(h), "skipped_variants": skipped,
        "reference": {"val_gain": ctx.table.reference["val"], "val_plan": ctx.table.best_val,
                      "test_gain": ctx.table.reference["test"], "test_plan": ctx.table.best_test},
        "noise_sd_db": ctx.table.noise_sd, "noise_sd_plain_db": ctx.table.noise_sd_plain,
        "noise_ceiling_spearman": ctx.table.noise_ceiling,
        "oracle_noise": ("the measured seed-to-seed SD (robust: MAD)" if math.isfinite(ctx.table.noise_sd) else
                         "none: the table has no second-seed plans, so the oracle is noiseless"),
        "surrogate": {"model": f"RandomForestRegressor(200 trees, min leaf 2), gains floored at {SURROGATE_FLOOR_DB:+g} dB",
                                                          **ctx.surrogate.cross_validate()},
        "variants": {name: {"settings": variants[name], **s} for name, s in summarise(runs).items()},
        "runs": runs, "signal_quality": signal_quality(ctx, PRIOR_SIGNALS), "seconds": time.time() - wall,
    }
    _print(result)
    out = args.out or RESULTS / f"replay-{spec['name']}.json"
    from autopeft._io import atomic_write_json

    atomic_write_json(out, result, default=str)
    print(f"written {out}")
    return result


def run_pooled(args: argparse.Namespace, declared: dict[str, Any]) -> dict[str, Any]:
    lab = [n for n, s in declared["scenarios"].items() if s["role"] == "lab"]
    files = {n: args.results / f"replay-{n}.json" for n in lab}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"missing replay files: {', '.join(missing)}; run `python bench/replay.py --scenario NAME` for each.")
    per_scenario, names = {}, None
    for n, path in files.items():
        data = json.loads(path.read_text(encoding="utf-8"))
        per_scenario[n] = {v: [r["area_val"] for r in sorted(rs, key=lambda r: r["seed"])] for v, rs in data["runs"].items()}
        names = list(data["variants"]) if names is None else [v for v in names if v in data["variants"]]
    candidates = [v for v in names if v not in (BASELINE, "random") and not v.startswith(("oracle", "inverted-", "permuted-"))]
    oracles = [v for v in names if v.startswith("oracle")]
    controls = [v for v in names if v.startswith(("inverted-", "permuted-"))]
    decision = decide(per_scenario, candidates, oracle=None, controls=controls)
    oracle = {o: decide(per_scenario, [o])["variants"][o] for o in oracles}
    decision["oracle"] = {o: v["qualifies"] for o, v in oracle.items()}
    if oracles and not any(decision["oracle"].values()):
        decision["text"] += "; the noisy ORACLE qualifies at no beta: the prior's injection is broken, fix it before deciding"
    result = {"benchmark": "replay-pooled", "rule": declared["decisions"]["prior_default"], "controls": declared["decisions"]["controls"],
              "scenarios": list(files), "decision": decision, "oracle_verdicts": oracle,
              "command": "python bench/replay.py --pooled", "code_version": code_version()}
    print(decision["text"])
    if decision["fading_too_slow"]:
        print(f"fading too slow (a control worse than priors off by more than 10%): {', '.join(decision['fading_too_slow'])}")
    from autopeft._io import atomic_write_json

    out = args.out or RESULTS / "replay.json"
    atomic_write_json(out, result, default=str)
    print(f"written {out}")
    return result


def _fmt(s: dict[str, Any]) -> str:
    return f"{s['mean']:+.3f} t[{s['t_ci'][0]:+.3f}, {s['t_ci'][1]:+.3f}] BCa[{s['bca_ci'][0]:+.3f}, {s['bca_ci'][1]:+.3f}]"


def _print(result: dict[str, Any]) -> None:
    ref = result["reference"]
    sur = result["surrogate"]
    print(f"\nreference: best by validation {ref['val_gain']:+.3f} dB ({ref['val_plan']}), by test {ref['test_gain']:+.3f} dB "
          f"({ref['test_plan']}); seed-to-seed SD {result['noise_sd_db']:.3f} dB (robust; plain "
          f"{result.get('noise_sd_plain_db', float('nan')):.3f})")
    print(f"surrogate ({sur['folds']}-fold over {sur['plans']} plans): val gain R2 {sur['val_gain']['r2']:.2f} Spearman "
          f"{sur['val_gain']['spearman']:.2f}; test gain R2 {sur['test_gain']['r2']:.2f} Spearman {sur['test_gain']['spearman']:.2f}")
    if "above_floor" in sur:
        above, top = sur["above_floor"], sur["top_quarter_by_val"]
        print(f"  the {above['plans']} plans above {sur['floor_db']:+g} dB: val R2 {above['val_gain']['r2']:.2f} Spearman "
              f"{above['val_gain']['spearman']:.2f}; the top quarter by validation ({top['plans']}): Spearman "
              f"{top['val_gain']['spearman']:.2f}")
    print(f"\n{'variant':<22} {'area val':>9} {'area test':>9} {'final val':>9} {'trials':>6} {'surr.':>5}  "
          f"area val - {BASELINE} (mean, t and BCa 95%)")
    for name, v in result["variants"].items():
        diff = v.get(f"vs_{BASELINE}", {}).get("area_val")
        print(f"{name:<22} {v['area_val']:9.3f} {v['area_test']:9.3f} {v['final_val']:9.3f} {v['trials']:6.1f} "
              f"{v['from_surrogate']:5.1f}  {_fmt(diff) if diff else '-'}")
    quality = result["signal_quality"]
    for signal, q in quality.items():
        if isinstance(q, dict) and "val" in q:
            fig, k = q["val"], q["val"]["k"]
            sp = fig["spearman"]
            print(f"{signal} (validation, {quality['plans']} plans): top-{k} recall {fig['top_k_recall']['value']:.2f}, "
                  f"NDCG@{k} {fig['ndcg_at_k']['value']:.2f}, Spearman {sp['value']:+.2f} [{sp['low']:+.2f}, {sp['high']:+.2f}] "
                  f"({sp['method']}), partialled on log count {fig['partial_spearman']['value']:+.2f}; noise ceiling "
                  f"{quality['noise_ceiling_spearman']:.2f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    declared = load_declared()
    if args.pooled:
        return run_pooled(args, declared)
    return run_scenario(args, declared)


if __name__ == "__main__":
    main()
