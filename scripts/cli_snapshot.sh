#!/bin/bash
# Snapshot of the CLI's outputs (stdout+stderr+exit code) for the layout refactor: run before and after, diff.
# usage: cli_snapshot.sh REPO OUTDIR   (REPO: a checkout with its own .venv, whose peft-ft is what runs)
# -e/-u/pipefail guard the script's own steps; the CLI commands it records fail on purpose, and snap keeps their rc.
set -euo pipefail

usage() {
  cat <<'TXT'
usage: scripts/cli_snapshot.sh REPO OUTDIR

Records what REPO/.venv/bin/peft-ft prints (stdout+stderr, then rc=N) for 53 commands: help, explain, validate
of every recipe, refusals, predict. One file per command in OUTDIR (created if needed). Run it before and after
a restructuring and `diff -r` the two folders. REPO needs its .venv with peft-ft installed.
TXT
}

case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -ne 2 ] || [ -z "$1" ] || [ -z "$2" ]; then
  usage >&2
  exit 2
fi
REPO=$1; OUT=$2
# Refused before anything is written: without a peft-ft every file would just say rc=127.
if [ ! -x "$REPO/.venv/bin/peft-ft" ]; then
  echo "cli_snapshot.sh: REPO $REPO has no .venv/bin/peft-ft; give a checkout with its venv (python -m venv .venv; .venv/bin/pip install -e .)" >&2
  exit 2
fi
case "$OUT" in -*) echo "cli_snapshot.sh: OUTDIR $OUT starts with '-'; write ./$OUT to mean a folder of that name" >&2; exit 2 ;; esac
if ! mkdir -p -- "$OUT" 2>/dev/null; then
  echo "cli_snapshot.sh: cannot create OUTDIR $OUT; give a folder you can write" >&2
  exit 2
fi
# Absolute paths: the commands run from REPO, and a relative OUT would land inside it.
OUT=$(cd -- "$OUT" && pwd); REPO=$(cd -- "$REPO" && pwd)
# Scratch files of this run only (not fixed /tmp names another user's run could share), removed at exit.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$REPO"
P="$REPO/.venv/bin/peft-ft"
# The scratch folder's name changes per run: it is written as $TMP so two snapshots diff clean.
snap() {
  local name=$1 rc=0; shift
  "$@" </dev/null >"$tmp/out" 2>&1 || rc=$?
  { sed "s|$tmp|\$TMP|g" "$tmp/out"; echo "rc=$rc"; } >"$OUT/$name.txt"
}
snap help $P --help
for c in run validate explain merge predict serve compare sweep export register-embedded; do snap help_$c $P $c --help; done
snap explain $P explain
for s in model task data adapter train eval output nosuch; do snap explain_$s $P explain $s; done
for r in recipes/*.toml recipes/glue/*.toml; do n=$(echo $r | tr / _); snap validate_$n $P validate $r; done
printf '[model]\nname = 3\n[train]\nlr = "fast"\nbogus = 1\n[adapter]\nmethod = "lorra"\n' > "$tmp/bad_recipe.toml"
snap validate_bad $P validate "$tmp/bad_recipe.toml"
snap validate_set $P validate recipes/scientsbank_lora.toml --set adapter.r=0 --set task.type=nerr
snap validate_prefix $P validate recipes/scientsbank_prefix_tuning.toml --set train.activation_checkpointing=true
snap predict_missing $P predict --adapter a=/nonexistent /nonexistent
printf '{"text": "EU rejects German call to boycott British lamb ."}\n{"text": "Peter Blackburn lives in Ouagadougou"}\n' > "$tmp/ner_rows.jsonl"
snap predict_ner $P predict --adapter ner=adapters/conll_lora "$tmp/ner_rows.jsonl"
printf '{"text": "What is a conductor?", "text_pair": "It lets electricity flow."}\n' > "$tmp/grade_rows.jsonl"
snap predict_grade $P predict --adapter g=adapters/grading_lora "$tmp/grade_rows.jsonl"
snap merge_missing $P merge /nonexistent --out "$tmp/x"
snap export_missing $P export /nonexistent --onnx "$tmp/x"
snap run_missing $P run /nonexistent.toml
