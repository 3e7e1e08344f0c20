"""What a finished search run measured, for scripts/gpu-check.sh: printed and written as JSON.

    python scripts/gpu_check_report.py RUN_DIR [--memory-log FILE] [--cache DIR] [--wall-seconds S]
                                       [--json bench/results/gpu-check.json]

Everything comes from what the run left behind, nothing is re-run:

- fine-tuning seconds per epoch: each trained pair's wall time (``trials/*.json``: its ``pairs``)
  over the run's fine-tuning epochs; the source model's loading and the validation scoring are
  included, so this is an upper bound of the training step's own time;
- pre-training seconds per epoch: the source models' ``history.json`` in the cache the run used
  (``--cache``, the ``$AUTOPEFT_CACHE`` of the run), when given;
- peak GPU memory: the largest ``memory.used`` (MiB) in ``--memory-log``, the output of
  ``nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms ...`` sampled while the
  run went on (every process on the device; autopeft's records hold no memory figure);
- slot use: ``slots.json`` (trial seconds over slots x wall time of the trial phase);
- Table 1: the confirmation's rows on test subjects (``summary.json``), as the search prints them;
- mixed precision: the run's ``amp`` setting (``run.json``, ``--amp``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from autopeft._io import atomic_write_json
from autopeft.report._results import CONFIRMED_COLUMNS, confirmed_rows  # the rows the search itself prints
from autopeft.runs import read_meta, records
from autopeft.tables import print_table

__all__ = ["summarise", "main"]


def _peak_memory_mib(memory_log: Path | None) -> float | None:
    if memory_log is None or not memory_log.is_file():
        return None
    values = []
    for line in memory_log.read_text(encoding="utf-8").splitlines():
        try:
            values.append(float(line.strip().split(",")[0]))
        except ValueError:
            continue  # a header, or a line nvidia-smi cut off when it was stopped
    return max(values) if values else None


def _pretrain_seconds_per_epoch(cache: Path | None) -> list[float]:
    if cache is None:
        return []
    rates = []
    for history in sorted((cache / "pretrained").glob("*/history.json")):
        epochs = json.loads(history.read_text(encoding="utf-8"))
        if epochs:
            rates.append(sum(float(e["seconds"]) for e in epochs) / len(epochs))
    return rates


def summarise(run_dir: str | Path, *, memory_log: str | Path | None = None, cache: str | Path | None = None,
              wall_seconds: float | None = None) -> dict[str, Any]:
    """The measurements of a finished search run (module docstring).

    Args:
        run_dir: the search's run directory (``--out``).
        memory_log: nvidia-smi's ``memory.used`` samples taken while the run went on, if any.
        cache: the ``$AUTOPEFT_CACHE`` the run pre-trained its source models into, if known.
        wall_seconds: the whole check's wall time, recorded as given.

    Returns:
        A JSON-ready dict; ``table1`` is empty when the run confirmed nothing.
    """
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    config = meta.get("config") or {}
    epochs = int(config.get("epochs") or 0)
    trials = records(run_dir)
    pair_rates = [float(pair["seconds"]) / epochs for record in trials for pair in record.get("pairs") or []
                  if epochs > 0 and float(pair.get("seconds") or 0) > 0]
    states: dict[str, int] = {}
    for record in trials:
        states[record["state"]] = states.get(record["state"], 0) + 1
    slots_path = run_dir / "slots.json"
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    confirmation = summary.get("confirmation") or {}
    pretrain = _pretrain_seconds_per_epoch(Path(cache) if cache is not None else None)
    return {
        "run_dir": str(run_dir),
        "backbone": config.get("backbone"), "preset": config.get("preset"), "device": config.get("device"),
        "gpus_per_trial": config.get("gpus_per_trial"), "concurrency": config.get("concurrency"),
        "scanners": config.get("scanners"), "epochs": epochs, "pretrain_epochs": config.get("pretrain_epochs"),
        # --amp: mixed precision (autopeft.precision.amp_precision: bfloat16 on GPUs that have it, else float16).
        "amp": bool(config.get("amp", False)),
        "versions": meta.get("versions"),
        "wall_seconds": wall_seconds,
        "trials": states,
        "finetune_seconds_per_epoch": {"median": statistics.median(pair_rates), "max": max(pair_rates),
                                       "pairs": len(pair_rates)} if pair_rates else None,
        "pretrain_seconds_per_epoch": statistics.median(pretrain) if pretrain else None,
        "peak_gpu_memory_mib": _peak_memory_mib(Path(memory_log) if memory_log is not None else None),
        "slots": json.loads(slots_path.read_text(encoding="utf-8")) if slots_path.is_file() else [],
        "table1": confirmed_rows(confirmation) if confirmation.get("plans") else [],
    }


_AMP = {True: "on (--amp: bfloat16 where the GPU has it, else float16 with loss scaling)", False: "off (float32)"}


def _print(result: dict[str, Any]) -> None:
    finetune = result["finetune_seconds_per_epoch"]
    print(f"\ngpu-check: {result['backbone']}/{result['preset']} on {result['device']}, {result['gpus_per_trial']} GPU(s) "
          f"per trial, mixed precision: {_AMP[result['amp']]}")
    print("trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(result["trials"].items())))
    if finetune:
        print(f"fine-tuning: {finetune['median']:.2f} s/epoch (median over {finetune['pairs']} trained pairs, max "
              f"{finetune['max']:.2f}; a pair's wall time over its {result['epochs']} epochs, loading and scoring included)")
    if result["pretrain_seconds_per_epoch"] is not None:
        print(f"pre-training: {result['pretrain_seconds_per_epoch']:.2f} s/epoch (median over the source models)")
    peak = result["peak_gpu_memory_mib"]
    print(f"peak GPU memory: {peak:,.0f} MiB (nvidia-smi, every process on the device)" if peak is not None
          else "peak GPU memory: not measured (no nvidia-smi samples)")
    for number, slot in enumerate(result["slots"], 1):
        print(f"slot use, session {number}: {100 * slot['busy_share']:.0f}% of {slot['concurrency']} slot(s) busy over a "
              f"{slot['phase_seconds'] / 60:.1f}-minute trial phase")
    if result["table1"]:
        print("Table 1 (test subjects):")
        print_table(result["table1"], CONFIRMED_COLUMNS, left=("method", "plan"))
    else:
        print("Table 1: none (the run confirmed nothing)")
    if result["wall_seconds"] is not None:
        print(f"wall time: {result['wall_seconds'] / 60:.1f} min")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the search's run directory")
    parser.add_argument("--memory-log", default=None, help="nvidia-smi memory.used samples (MiB, one per line)")
    parser.add_argument("--cache", default=None, help="the AUTOPEFT_CACHE the run used (source models' history)")
    parser.add_argument("--wall-seconds", type=float, default=None, help="the check's wall time")
    parser.add_argument("--json", default=None, help="write the summary here (e.g. bench/results/gpu-check.json)")
    args = parser.parse_args(argv)
    if not (Path(args.run_dir) / "run.json").is_file():
        print(f"gpu_check_report.py: {args.run_dir} holds no run.json: not a search's run directory.", file=sys.stderr)
        return 2
    result = summarise(args.run_dir, memory_log=args.memory_log, cache=args.cache, wall_seconds=args.wall_seconds)
    _print(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(args.json), result)
        print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
