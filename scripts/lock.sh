#!/usr/bin/env bash
# Regenerate requirements.lock: every runtime, test and optional dependency pinned at the newest
# versions pyproject's ranges allow (run scripts/check_latest.sh first to see that they pass).
# torch is resolved against the local CPU wheel and left out of the lock: it is installed first,
# on its own (CPU or the CUDA build a GPU machine wants), and the lock must not pull CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-uv}
command -v "$uv" >/dev/null || uv=".venv/bin/uv"
echo "torch==2.13.0+cpu" > /tmp/peft-ft-torch-override.txt
# --upgrade: without it uv keeps the versions the existing lock already pins (pyarrow stayed at 24.0.0
# after the range admitted 26.0.1), which is not "the newest the ranges allow".
"$uv" pip compile pyproject.toml --all-extras --upgrade --python-version 3.11 \
    --find-links /opt/wheels --override /tmp/peft-ft-torch-override.txt \
    --no-emit-package torch --no-emit-package peft-ft --no-header --quiet \
    --output-file requirements.lock
sed -i '1i # Pinned versions the test suite passed on. Regenerate with scripts/lock.sh; use as a constraints file:\n#   pip install torch==2.13.0 \&\& pip install -c requirements.lock -e ".[test]"' requirements.lock
