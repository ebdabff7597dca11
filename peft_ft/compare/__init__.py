"""`peft-ft compare`: the same recipe trained with several adapter methods (and seeds), side by side.

Each variant (recipe x method x seed) is written out as its own resolved recipe and trained in its
own subprocess (`python -m peft_ft.compare.child VARIANT.toml`), so that the peak memory each run reports
is its own: a process's peak RSS only ever grows. The child also times evaluation on a reloaded
model (`measure_latency`) and leaves `compare.json` in its run folder; a run folder holding both
`metrics.json` and `compare.json` is finished, and `--resume` skips it. The tables are computed
from the run folders' own files, never from numbers kept in memory.

Modules: `variants` (what to train: one resolved recipe per recipe x method x seed), `child` (one variant trained in
its own process, then timed), `report` (the tables and the plot, from the run folders' files), `runner` (`compare`:
train what is not finished yet, then report).
"""
