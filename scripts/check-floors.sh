#!/usr/bin/env bash
# Run the fast tests against the oldest versions pyproject.toml allows: its floors.
#
#   bash scripts/check-floors.sh
#
# A separate environment gets every dependency of pyproject.toml ([project] dependencies and the
# test extra) pinned to its floor (the version after ">="), through a pip constraints file made
# from pyproject.toml, and then `pytest -m "not slow"` runs in it, with two slow tests besides:
# the fast tests never start Ray nor draw the report, so Ray Tune's API and the report's plotly and
# pandas (Styler) would go untested at their floors. A floor that fails here is raised in
# pyproject.toml, never left as a promise.
#
# torch is not floor-tested: it stays the CPU build setup.sh installs (torch==2.13.0, the CPU wheel
# our CI machines have); an older torch would pull a multi-GB CUDA build. The bench extra (peft)
# is not tested either: CI does not install it.
#
# Environment:
#   AUTOPEFT_FLOORS_VENV  the environment (default: .venv-floors beside this repo); kept between
#                         runs, so a second run installs nothing new.
#   AUTOPEFT_TORCH        the torch requirement (default: torch==2.13.0, as setup.sh).
# pip's cache is used as usual (PIP_CACHE_DIR), so downloads are not repeated. Needs Python 3.11+
# (tomllib reads pyproject.toml).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${1:-}" in
  -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}"; exit 0 ;;
  "") ;;
  *) echo "check-floors.sh: unknown option '$1' (valid: --help)" >&2; exit 2 ;;
esac

venv="${AUTOPEFT_FLOORS_VENV:-$repo/.venv-floors}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
constraints="$venv/floors.txt"

# name==floor for every ">=" requirement but torch's; a requirement without a floor is an error,
# since nothing would say which oldest version to test.
"$py" - "$repo/pyproject.toml" >"$constraints" <<'EOF'
import re
import sys
import tomllib

with open(sys.argv[1], "rb") as handle:
    project = tomllib.load(handle)["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?>=([^,;\s]+)", requirement.replace(" ", ""))
    if match is None:
        sys.exit(f"check-floors.sh: the requirement {requirement!r} in pyproject.toml must be 'name>=floor'.")
    name, _, floor = match.groups()
    if name != "torch":
        print(f"{name}=={floor}")
EOF

"$py" -m pip install --quiet "${AUTOPEFT_TORCH:-torch==2.13.0}"
# The torch installed is pinned too: a floor that caps torch must fail here, not swap in a CUDA build.
echo "torch==$("$py" -c 'import torch; print(torch.__version__)')" >>"$constraints"
"$py" -m pip install --quiet -c "$constraints" -e "$repo[test]"
"$py" -m pip check
echo "check-floors.sh: testing with $(tr '\n' ' ' <"$constraints")"
cd "$repo"
"$py" -m pytest -q -m "not slow" tests
"$py" -m pytest -q tests/runner/test_search_engine.py::test_search_warm_starts_with_top_prior_plans_and_writes_outputs \
  tests/report/test_report.py
