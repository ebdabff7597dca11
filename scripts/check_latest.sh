#!/usr/bin/env bash
# Does the suite pass on the newest releases? Installs them into a throwaway venv and runs the tests there.
#
#   scripts/check_latest.sh              newest versions pyproject's ranges allow (what `pip install peft-ft` gets today)
#   scripts/check_latest.sh --uncapped   newest releases on the registry, past our upper bounds: how the next
#                                        transformers/peft release is caught before we raise a cap and users meet it
#   extra arguments go to pytest, e.g.   scripts/check_latest.sh --uncapped tests/test_methods.py -x
#
# It prints every installed version that differs from requirements.lock, and every direct dependency whose newest
# release on the registry was not installed (capped, or not installable: what it needs is missing there). When the
# suite passes, raise the caps in pyproject.toml to those versions and run scripts/lock.sh. torch stays at the local
# CPU wheel (2.13.0): a newer torch from the registry is a multi-GB CUDA build.
set -euo pipefail

usage() {
  cat <<'TXT'
usage: scripts/check_latest.sh [--uncapped] [PYTEST_ARGS...]

Does the suite pass on the newest releases? Installs them into a throwaway venv (network, minutes) and runs
the tests there; prints every installed version that differs from requirements.lock and every direct
dependency not at the registry's newest release. torch stays at the local CPU wheel (2.13.0).
  (no option)   the newest versions pyproject's ranges allow (what `pip install peft-ft` gets today)
  --uncapped    the newest releases on the registry, past our upper bounds (must come first)
  PYTEST_ARGS   everything else goes to pytest, e.g. scripts/check_latest.sh --uncapped tests/test_methods.py -x
-h/--help prints this and installs nothing (pytest's own help: .venv/bin/python -m pytest --help).
TXT
}

# Before anything is installed: the venv and the downloads take minutes, and --help wants none of them.
for arg in "$@"; do
  case "$arg" in -h|--help) usage; exit 0 ;; esac
done
cd "$(dirname "$0")/.."
uncapped=0
if [ "${1:-}" = "--uncapped" ]; then uncapped=1; shift; fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
"$py" -m pip install --quiet --upgrade pip uv
"$py" -m pip install --quiet torch==2.13.0
overrides=()
if [ "$uncapped" = 1 ]; then
  # Every dependency of ours with its upper bound dropped (torch kept, see above); uv lets an override replace
  # the package's own requirement, which pip cannot.
  "$py" - > "$tmp/overrides.txt" <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
specs = list(project["dependencies"]) + [d for deps in project["optional-dependencies"].values() for d in deps]
for spec in specs:
    name = re.match(r"[A-Za-z0-9_.\-\[\]]+", spec).group(0)
    if name.startswith(("torch", "peft-ft")):
        continue
    lower = re.search(r">=\s*([^,;\s]+)", spec)
    marker = spec.split(";", 1)[1] if ";" in spec else ""
    print(f"{name}>={lower.group(1)}" if lower else name, f"; {marker.strip()}" if marker else "", sep="")
PY
  overrides=(--override "$tmp/overrides.txt")
fi
"$tmp/venv/bin/uv" pip install --quiet --python "$py" "${overrides[@]}" -e '.[test]'

echo "versions that differ from requirements.lock:"
"$py" -m pip freeze --exclude-editable | "$py" -c '
import re, sys
locked = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", open("requirements.lock").read(), re.M))
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
locked = {norm(k): v for k, v in locked.items()}
for line in sys.stdin:
    m = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
    if m and norm(m.group(1)) in locked and locked[norm(m.group(1))] != m.group(2):
        print(f"  {m.group(1)} {locked[norm(m.group(1))]} -> {m.group(2)}")
'
# A release the resolver could not take is easy to miss: transformers 5.25.0 needs kernels>=0.19.1, which the
# registry did not have, and --uncapped quietly installed 5.24.0. Name every direct dependency left behind.
echo "direct dependencies not at the registry's newest release:"
"$py" - <<'PY'
import importlib.metadata as md, json, re, subprocess, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
specs = list(project["dependencies"]) + [d for deps in project["optional-dependencies"].values() for d in deps]
names = sorted({re.match(r"[A-Za-z0-9_.\-]+", s).group(0) for s in specs} - {"torch", "peft-ft"})
for name in names:
    try:
        installed = md.version(name)
    except md.PackageNotFoundError:
        continue  # an extra of another platform (bitsandbytes off Linux)
    found = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "--json", name],
                           capture_output=True, text=True)
    if found.returncode == 0 and (newest := json.loads(found.stdout)["latest"]) != installed:
        print(f"  {name}: {installed} installed, {newest} on the registry")
PY
"$py" -m pytest -q "$@"
