"""`peft-ft export RUN_DIR --onnx OUT`: the run's model, adapter merged in, as ONNX for onnxruntime.

The adapter is folded into the base (`merge_and_unload`, as `peft-ft merge`), then exported by torch's
own exporter (`torch.onnx.export(dynamo=True)`, onnxscript underneath) with the batch and sequence axes
dynamic. The export is checked before it is kept: onnxruntime answers texts of other lengths and batch
sizes than the ones traced, and the largest difference to the PyTorch logits is printed; above the
tolerance the export is refused (nothing is written). The legacy TorchScript exporter (`dynamo=False`)
traced the attention mask's shape handling of transformers 5 into constants and gave logits 0.17 off on
the tiny test BERT: that is the failure this check exists for.

OUT (new or empty) holds `model.onnx`, the tokenizer, `config.json` (label names), `labels.json`,
`peft_ft.json`, `export.json` (inputs, outputs, opset, tolerance and the measured difference) and README.md
(onnxruntime code answering as peft-ft does).
Text classification, NER and extractive QA models export; seq2seq generation and prompt-learning adapters
(nothing to merge) are refused with the reason.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from peft_ft.errors import PeftFtError
from peft_ft.models.safety import check_no_pickle
from peft_ft.rundir.card import onnx_card
from peft_ft.rundir.layout import CARD, INFO, LABELS, RECIPE, read_info, read_recipe
from peft_ft.rundir.portable import moved_info
from peft_ft.rundir.load import load_run
from peft_ft.serving.merge import check_mergeable, check_out, save_tokenizer, staged, unwrap_heads
from peft_ft.storage import write_atomic, write_json
from peft_ft.tasks import TASKS

# What each family's model returns: ONNX output names, taken from the model output of the same name.
# Texts the export is traced on and checked with (other lengths and batch sizes for the check).
TRACE = ["john smith lives in paris .", "the plot was great"]
CHECK = ["mary works at acme corp in london and paris .", "good", "where does john live ?", "the film was awful , not good at all ."]


def _inputs(task: str, tokenizer, texts: list[str]) -> dict:
    if TASKS[task].onnx_pairs:  # question, then a context
        return tokenizer(texts, [t[::-1] + " " + t for t in texts], padding=True, return_tensors="pt")
    return tokenizer(texts, padding=True, return_tensors="pt")


def _wrap(model, input_names: list[str], output_names: list[str]):
    """The model as the exporter wants it: positional tensors in, a tuple of tensors out."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            out = self.model(**dict(zip(input_names, tensors)))
            return tuple(getattr(out, n) for n in output_names)

    return Wrapped().eval()


def export_onnx(run_dir: str | Path, out: str | Path, tolerance: float = 1e-4, allow_pickle: bool = False,
                trust_remote_code: bool = False) -> dict:
    """Merge, export, check with onnxruntime; returns export.json's content. OUT is complete or absent.
    The base model's own Python code runs only with `trust_remote_code` (--trust-remote-code; peft_ft.models.safety)."""
    run_dir, out = Path(run_dir), Path(out)
    info = read_info(run_dir)
    check_no_pickle(run_dir, "run folder", allow_pickle)
    check_out(out, "--onnx")
    if not TASKS[info["task"]].onnx_outputs:
        exporting = ", ".join(t.name for t in TASKS.values() if t.onnx_outputs)
        raise PeftFtError(f"{run_dir}: task {info['task']!r} cannot be exported to ONNX by peft-ft export (generation loops are "
                          f"not one graph); families that export: {exporting}")
    if info["is_adapter"]:
        check_mergeable(run_dir, info)
    _check_installed()
    model, tokenizer, info = load_run(run_dir, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if info["is_adapter"]:
        model = unwrap_heads(model.merge_and_unload())  # the active adapter's trained head as a plain module
    model.eval()
    with staged(out, "exporting", "--onnx") as staging:
        report = _export(model, tokenizer, info["task"], staging / "model.onnx")
        report["tolerance"] = tolerance
        if report["max_abs_diff"] > tolerance:
            raise PeftFtError(f"{run_dir}: the ONNX export answers differently from PyTorch: max |logit difference| "
                              f"{report['max_abs_diff']:.3g} on {report['checked_texts']} texts, above the tolerance {tolerance:g}; "
                              f"nothing was written (raise --tolerance only if you accept that difference)")
        model.config.save_pretrained(staging)
        save_tokenizer(tokenizer, staging, run_dir)  # with the run's model.max_length
        for name in (LABELS, RECIPE):
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, staging / name)
        write_json(staging / INFO, {**moved_info(run_dir, out), "is_adapter": False, "exported_from": run_dir.resolve().name,
                                    "format": "onnx"})
        write_json(staging / "export.json", report)
        exported = {**info, "exported_from": run_dir.resolve().name}
        write_atomic(staging / CARD, onnx_card(read_recipe(run_dir), exported, report, out.name))
    return report


def _check_installed() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise PeftFtError(f"peft-ft export --onnx needs {', '.join(missing)}: pip install 'peft-ft[export]'")


def _export(model, tokenizer, task: str, path: Path) -> dict:
    import warnings

    import numpy as np
    import onnxruntime
    import torch

    traced = _inputs(task, tokenizer, TRACE)
    input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in traced]
    output_names = list(TASKS[task].onnx_outputs)
    wrapped = _wrap(model, input_names, output_names)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, tuple(traced[n] for n in input_names), str(path), input_names=input_names,
                          output_names=output_names, dynamo=True, external_data=False,
                          dynamic_shapes=(tuple({0: batch, 1: sequence} for _ in input_names),))  # one entry: *tensors
    strip_debug_metadata(path)  # before the check: the file checked is the file kept
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for texts in (CHECK, CHECK[:1], TRACE):  # other batch sizes and lengths than traced, and the traced ones
        enc = _inputs(task, tokenizer, texts)
        answers = session.run(output_names, {n: enc[n].numpy() for n in input_names})
        with torch.no_grad():
            expected = wrapped(*(enc[n] for n in input_names))
        # NaN compares false with everything, so max() would pass it over: a NaN logit is the worst difference.
        worst = max(worst, *(float(np.nan_to_num(np.abs(a - e.numpy()), nan=np.inf).max()) for a, e in zip(answers, expected)))
    return {
        "file": path.name, "inputs": input_names, "outputs": output_names, "dynamic_axes": ["batch", "sequence"],
        "opset": _opset(path), "max_abs_diff": worst, "checked_texts": len(CHECK) + 1 + len(TRACE),
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
    }


def strip_debug_metadata(path: Path) -> None:
    """Remove the exporter's debugging notes from the ONNX file: every node's source stack trace (this machine's
    absolute paths to peft-ft and site-packages, hundreds per file), module names, FX nodes, the optimizer's notes on
    values, the exported program's signature. onnxruntime reads none of them; the model-level metadata is kept."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    _strip_graph(model.graph)
    for function in model.functions:
        del function.metadata_props[:]
        for node in function.node:
            _strip_node(node)
    onnx.save(model, str(path))


def _strip_graph(graph) -> None:
    del graph.metadata_props[:]
    for value in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
        del value.metadata_props[:]
    for node in graph.node:
        _strip_node(node)


def _strip_node(node) -> None:
    del node.metadata_props[:]
    for attribute in node.attribute:  # the branches and bodies of If / Loop / Scan
        for graph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            _strip_graph(graph)


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
