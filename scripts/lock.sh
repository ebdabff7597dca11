#!/usr/bin/env bash
# Regenerate requirements.lock: every runtime, test and optional dependency pinned at the newest
# versions pyproject's ranges allow (run scripts/check_latest.sh first to see that they pass).
# torch is resolved against the local CPU wheel and left out of the lock: it is installed first,
# on its own (CPU or the CUDA build a GPU machine wants), and the lock must not pull CUDA packages.
set -euo pipefail

usage() {
  cat <<'TXT'
usage: scripts/lock.sh [-h|--help]

Rewrites requirements.lock with the newest versions pyproject.toml's ranges allow (uv pip compile, every
extra, torch pinned to the local CPU wheel and left out). Takes no arguments; run scripts/check_latest.sh
first to see that the suite passes on those versions. env: UV (the uv to run; default uv, else .venv/bin/uv).
TXT
}

# Arguments first: the lock is rewritten in place, so anything else must stop before it is touched.
if [ $# -gt 0 ]; then
  case "$1" in -h|--help) usage; exit 0 ;; esac
  echo "lock.sh: unknown argument '$1' (it takes none)" >&2
  usage >&2
  exit 2
fi
cd "$(dirname "$0")/.."
uv=${UV:-uv}
command -v "$uv" >/dev/null || uv=".venv/bin/uv"
# This run's own override file, not a fixed /tmp name that another user's run could share.
override=$(mktemp)
trap 'rm -f "$override"' EXIT
echo "torch==2.13.0+cpu" > "$override"
# --upgrade: without it uv keeps the versions the existing lock already pins (pyarrow stayed at 24.0.0
# after the range admitted 26.0.1), which is not "the newest the ranges allow".
"$uv" pip compile pyproject.toml --all-extras --upgrade --python-version 3.11 \
    --find-links /opt/wheels --override "$override" \
    --no-emit-package torch --no-emit-package peft-ft --no-header --quiet \
    --output-file requirements.lock
sed -i '1i # Pinned versions the test suite passed on. Regenerate with scripts/lock.sh; use as a constraints file:\n#   pip install torch==2.13.0 \&\& pip install -c requirements.lock -e ".[test]"' requirements.lock
