#!/bin/bash
# Snapshot of the CLI's outputs (stdout+stderr+exit code) for the layout refactor: run before and after, diff.
# usage: cli_snapshot.sh REPO OUTDIR
REPO=$1; OUT=$2; mkdir -p $OUT; cd $REPO
P="$REPO/.venv/bin/peft-ft"
snap() { name=$1; shift; { "$@"; echo "rc=$?"; } > "$OUT/$name.txt" 2>&1; }
snap help $P --help
for c in run validate explain merge predict serve compare sweep export register-embedded; do snap help_$c $P $c --help; done
snap explain $P explain
for s in model task data adapter train eval output nosuch; do snap explain_$s $P explain $s; done
for r in recipes/*.toml recipes/glue/*.toml; do n=$(echo $r | tr / _); snap validate_$n $P validate $r; done
printf '[model]\nname = 3\n[train]\nlr = "fast"\nbogus = 1\n[adapter]\nmethod = "lorra"\n' > /tmp/bad_recipe.toml
snap validate_bad $P validate /tmp/bad_recipe.toml
snap validate_set $P validate recipes/scientsbank_lora.toml --set adapter.r=0 --set task.type=nerr
snap validate_prefix $P validate recipes/scientsbank_prefix_tuning.toml --set train.activation_checkpointing=true
snap predict_missing $P predict --adapter a=/nonexistent /nonexistent
printf '{"text": "EU rejects German call to boycott British lamb ."}\n{"text": "Peter Blackburn lives in Ouagadougou"}\n' > /tmp/ner_rows.jsonl
snap predict_ner $P predict --adapter ner=adapters/conll_lora /tmp/ner_rows.jsonl
printf '{"text": "What is a conductor?", "text_pair": "It lets electricity flow."}\n' > /tmp/grade_rows.jsonl
snap predict_grade $P predict --adapter g=adapters/grading_lora /tmp/grade_rows.jsonl
snap merge_missing $P merge /nonexistent --out /tmp/x
snap export_missing $P export /nonexistent --onnx /tmp/x
snap run_missing $P run /nonexistent.toml
