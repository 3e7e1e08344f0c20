#!/usr/bin/env bash
# The paper preset end to end on one GPU with the real CLI, sized to take under 8 minutes:
# simulated data of scanners 1 and 5, a 4-trial `autopeft search --amp` on their 2 pairs (source models
# pre-trained first), the references and a confirmation with 1 fold x 1 seed; then prints seconds
# per epoch, peak GPU memory, slot use and the Table 1, and writes them as JSON.
#
#   bash scripts/gpu-check.sh [--backbone unetr|cvtgan] [--gpus-per-trial X] [--out DIR] [--json FILE] [--dry-run]
#
#   --backbone        default unetr (the paper UNETR, about 100M parameters)
#   --gpus-per-trial  default 1 (trials one at a time); 0.5 runs two side by side
#   --out             the check's folder (default runs/gpu-check-<time>): run/ (the search's run
#                     directory), cache/ (its fresh AUTOPEFT_CACHE: source models are pre-trained
#                     and timed every time; your own cache is not touched), gpu-memory.csv, log.txt
#   --json            default bench/results/gpu-check.json (scripts/gpu_check_report.py writes it)
#   --dry-run         print the autopeft commands and exit (no GPU needed; tests/test_gpu_check.py)
#
# Mixed precision: on, as the paper preset ran ("AMP on"): --amp trains, validates and scores under
# torch.autocast in bfloat16 on GPUs that have it (Ampere and later), else float16 with a GradScaler;
# weights stay float32, scores are computed in float32.
# Short schedules (20 fine-tuning and 20 pre-training epochs instead of the paper's 200 and 1000)
# make the scores meaningless: this checks that the paper path runs and what it costs, not results.
# The simulated data (2 scanners x 16 subjects at size 64, a minute or two of CPU) is kept in
# runs/gpu-check-data (AUTOPEFT_GPU_CHECK_DATA) and reused by later checks.
#
# Environment: AUTOPEFT_PYTHON, the Python of the environment to use (default: .venv beside this
# repo, as scripts/setup.sh makes it, else python3). Exits 2, saying why, when that Python's torch
# sees no GPU.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
backbone=unetr
gpus_per_trial=1
out=""
json="$repo/bench/results/gpu-check.json"
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --backbone) backbone="$2"; shift 2 ;;
    --gpus-per-trial) gpus_per_trial="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --json) json="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,27p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu-check.sh: unknown option '$1' (valid: --backbone, --gpus-per-trial, --out, --json, --dry-run, --help)" >&2; exit 2 ;;
  esac
done

py="${AUTOPEFT_PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
cli="$(dirname "$py")/autopeft"
[ -x "$cli" ] || cli="$(command -v autopeft || echo autopeft)"

out="${out:-$repo/runs/gpu-check-$(date +%Y%m%d-%H%M%S)}"
data="${AUTOPEFT_GPU_CHECK_DATA:-$repo/runs/gpu-check-data}"
simulate=("$cli" simulate --out "$data" --scanners 1,5 --subjects 16 --size 64 --quiet)
# --time-budget: no trial starts after 4 minutes (pre-training included), so the references and
# the confirmation still fit in 8.
search=("$cli" search --backbone "$backbone" --preset paper --budget 1% --data "$data/manifest.csv" --scanners 1,5
        --trials 4 --epochs 20 --pretrain-epochs 20 --time-budget 4m --no-portfolio
        --confirm 1 --confirm-folds 1 --confirm-seeds 1
        --device cuda --amp --gpus-per-trial "$gpus_per_trial" --quiet --out "$out/run")
if [ "$dry_run" = 1 ]; then
  printf '%q ' "${simulate[@]}"; echo
  printf '%q ' "${search[@]}"; echo
  exit 0
fi

if ! gpu="$("$py" -c 'import sys, torch
if not torch.cuda.is_available():
    sys.exit("torch " + torch.__version__ + " (CUDA " + str(torch.version.cuda) + ") sees no GPU")
print(torch.cuda.get_device_name(0))' 2>&1)"; then
  echo "gpu-check.sh: no GPU visible: ${gpu##*$'\n'} (Python: $py)." >&2
  echo "gpu-check.sh: run it on a machine with an NVIDIA GPU, a CUDA build of torch and CUDA_VISIBLE_DEVICES naming one (scripts/setup.sh keeps the torch you install first)." >&2
  exit 2
fi

mkdir -p "$out"
export AUTOPEFT_CACHE="$out/cache"
echo "gpu-check.sh: $backbone/paper on $gpu; writing $out"

# Device memory in use, sampled every 0.5 s while the check runs (stopped on exit, however it ends).
sampler=""
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$out/gpu-memory.csv" 2>/dev/null &
  sampler=$!
fi
stop_sampler() { if [ -n "$sampler" ]; then kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true; sampler=""; fi; }
trap stop_sampler EXIT

started=$(date +%s)
"${simulate[@]}" 2>&1 | tee "$out/log.txt"
"${search[@]}" 2>&1 | tee -a "$out/log.txt"
stop_sampler
"$py" "$repo/scripts/gpu_check_report.py" "$out/run" --memory-log "$out/gpu-memory.csv" --cache "$AUTOPEFT_CACHE" \
  --wall-seconds "$(( $(date +%s) - started ))" --json "$json"
