"""The parts of `peft-ft serve` (the command itself is `peft_ft.serving.serve`):

- `schemas`: pydantic request and response models per task family; they make `/docs` and `/openapi.json`.
- `scheduler`: one worker per loaded base; batches of bounded tokens, rows of several LoRA adapters in one
  forward (peft's per-row `adapter_names`), deadlines.
- `library`: which adapters are loaded: the allow-listed `--adapter-dir`, runtime load/unload, the LRU of
  `--max-adapters`.
- `app`: the FastAPI routes and the guard in front of them (Host, keys, body size and read timeout).
"""
