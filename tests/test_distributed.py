"""Data-parallel runs: `accelerate launch --config_file configs/accelerate/cpu_ddp.yaml -m peft_ft run`
(two CPU processes, accelerate's DDP over gloo) against one process.

The model has no dropout (neither BERT's nor LoRA's), so the only difference between one process
and two is float rounding: two processes average weighted per-share gradients where one process sums rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed

from helpers import recipe_text, sentiment_rows, write_jsonl, write_recipe
from peft_ft.data.batching import train_batches
from peft_ft.engine import distributed
from peft_ft.engine.run import resume, run
from peft_ft.errors import PeftFtError
from peft_ft.recipe.load import load_recipe

# Measured over 64 steps (2026-11-30, torch 2.13 CPU, accelerate 1.15 DDP): every metric equal, epoch train
# losses within 2e-7. lr 5e-3: at 1e-2 this tiny run turns unstable in epoch 5 (loss up from 0.46 to
# 0.59) and float rounding then grows to 4e-4 by epoch 6, in any data-parallel engine.
METRIC_TOLERANCE = 1e-6
LOSS_TOLERANCE = 2e-5
WEIGHT_TOLERANCE = 1e-5

gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                          reason="torch.distributed with gloo is not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPO = Path(__file__).resolve().parent.parent


def launch(recipe, *args, timeout=120, config="cpu_ddp.yaml", launcher=()) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/CONFIG LAUNCHER -m peft_ft run RECIPE ARGS` with this venv."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate" / config),
           *launcher, "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
           "-m", "peft_ft", "run", str(recipe), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    # Its own process group, killed whole on a timeout: subprocess.run kills the launcher only, and after two timed-out
    # DeepSpeed tests their training processes were still running many minutes after the suite ended.
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bert):
    tmp = tmp_path_factory.mktemp("dp")
    model = tmp / "model"
    shutil.copytree(tiny_bert, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    data = tmp / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", sentiment_rows(61, seed=1))
    write_jsonl(data / "valid.jsonl", sentiment_rows(11, seed=2))
    write_jsonl(data / "test.jsonl", sentiment_rows(13, seed=3))
    # Rows not a multiple of the batch size (61 = 7 x 8 + 5): the last batch splits 3 + 2, and the
    # validation and test splits (11, 13 rows) split unevenly too.
    recipe = write_recipe(tmp / "dp.toml", recipe_text(
        model, data, model_opts={"max_length": 32}, task={"type": "classification"},
        data={"validation": "valid.jsonl", "test": ["test.jsonl"]}, adapter={"method": "lora", "dropout": 0.0},
        train_opts={"epochs": 8, "batch_size": 8, "lr": 5e-3}, output={"dir": tmp / "one", "name": "dp"}))
    return tmp, recipe, data


@pytest.fixture(scope="module")
def one_process(setup):
    _, recipe, _ = setup
    return run(load_recipe(recipe))


@pytest.fixture(scope="module")
def two_processes(setup):
    tmp, recipe, _ = setup
    done = launch(recipe, "--set", f"output.dir={tmp / 'two'}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = list((tmp / "two" / "dp").iterdir())
    assert len(runs) == 1, runs  # one folder, made by the main process only
    return runs[0], done


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@gloo
def test_two_processes_write_one_complete_run_folder(one_process, two_processes):
    run_dir, done = two_processes
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == sorted(p.name for p in one_process.iterdir())  # same files, no leftovers of a second writer
    assert not [n for n in names if n.startswith(".")]
    log = (run_dir / "train.log").read_text()
    assert log.count("run folder ") == 1 and log.count("epoch 8: train loss") == 1  # the main process logs, once
    assert "data-parallel over 2 processes" in log
    assert done.stdout.count("done: ") == done.stdout.count(f"done: {run_dir}") == 1  # printed by the main process only
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"validation", "test", "train", "params"}
    assert metrics["train"]["steps"] == 64 and metrics["train"]["epochs_run"] == 8  # 8 epochs x ceil(61 / 8): global batches
    assert len(metrics["train"]["history"]) == 8


@gloo
def test_predictions_hold_every_row_exactly_once_in_order(setup, two_processes):
    run_dir, _ = two_processes
    _, _, data = setup
    for split, source in (("validation", "valid.jsonl"), ("test", "test.jsonl")):
        rows = read_jsonl(data / source)
        records = read_jsonl(run_dir / f"predictions_{split}.jsonl")
        assert [r["text"] for r in records] == [r["text"] for r in rows]
        assert [r["gold"] for r in records] == [r["label"] for r in rows]


@gloo
def test_two_processes_match_one_process(one_process, two_processes):
    run_dir, _ = two_processes
    assert_same_run(one_process, run_dir)


def assert_same_run(one_process: Path, run_dir: Path) -> None:
    """Metrics, losses per epoch, best epoch and saved adapter of `run_dir` equal the one-process run's to rounding."""
    from safetensors.torch import load_file

    one, two = (json.loads((d / "metrics.json").read_text()) for d in (one_process, run_dir))
    for split in ("validation", "test"):
        for key, value in one[split].items():
            if isinstance(value, dict):  # per-label scores: the same predictions give the same numbers
                assert two[split][key] == value
            else:
                assert two[split][key] == pytest.approx(value, abs=METRIC_TOLERANCE), (split, key)
    assert two["train"]["best_epoch"] == one["train"]["best_epoch"] < 8  # the best epoch's weights were restored
    metric = f"validation_{one['train']['best_metric']}"
    for a, b in zip(one["train"]["history"], two["train"]["history"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=LOSS_TOLERANCE)
        assert b[metric] == pytest.approx(a[metric], abs=METRIC_TOLERANCE)
    w1, w2 = (load_file(str(d / "adapter_model.safetensors")) for d in (one_process, run_dir))
    assert set(w1) == set(w2)
    assert any("lora_B" in n and w1[n].abs().max() > 1e-3 for n in w1)  # LoRA B starts at zero: these were trained
    for name in w1:
        assert (w1[name] - w2[name]).abs().max().item() < WEIGHT_TOLERANCE, name


@gloo
def test_bad_input_ends_both_processes_before_any_folder(setup):
    tmp, recipe, _ = setup
    done = launch(recipe, "--set", "data.train=missing.jsonl", "--set", f"output.dir={tmp / 'bad'}", timeout=90)
    assert done.returncode != 0
    # One process's exit 2 makes the launcher stop the other, which may not have printed yet: at least one names the file.
    assert "data.train: file not found" in done.stderr and "missing.jsonl" in done.stderr
    assert not (tmp / "bad").exists()


@pytest.mark.parametrize("n, batch_size, size", [(29, 8, 2), (30, 8, 3), (5, 8, 4), (3, 2, 4), (64, 16, 2)])
def test_shards_cover_every_row_once_with_equal_step_counts(n, batch_size, size):
    for epoch in (1, 2):
        batches = train_batches([i % 7 + 1 for i in range(n)], batch_size, group_by_length=True, seed=3, epoch=epoch)
        per_rank = [[distributed.shard(b, rank, size) for b in batches] for rank in range(size)]
        assert len({len(steps) for steps in per_rank}) == 1  # every process runs the same number of steps
        seen = sorted(i for steps in per_rank for share in steps for i in share)
        assert seen == list(range(n))  # every row once per epoch, across processes
        for b, shares in zip(batches, zip(*per_rank)):
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
            assert sorted(i for share in shares for i in share) == sorted(b)  # a step's shares make its global batch


def _worker(launcher_pid: int, rank: int) -> int:
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.environ().get("RANK") == str(rank):
                return child.pid
    raise AssertionError(f"no worker of rank {rank} under the launcher")


def _kill_rank_1(proc) -> None:
    """One worker gone (out of memory, a node lost) while the launcher, stopped, cannot yet stop the main process:
    that one meets the loss in its next collective, as when a signal reached the other worker first (CI, once)."""
    import time

    import psutil

    main, other = psutil.Process(_worker(proc.pid, 0)), _worker(proc.pid, 1)
    proc.send_signal(signal.SIGSTOP)
    try:
        os.kill(other, signal.SIGKILL)
        deadline = time.monotonic() + 60
        with contextlib.suppress(psutil.NoSuchProcess):
            while main.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGCONT)


def _stop(proc, how) -> None:
    if how == "rank 1 killed":
        _kill_rank_1(proc)
    elif how == signal.SIGINT:
        os.killpg(proc.pid, how)  # Ctrl-C reaches the whole group
    else:
        proc.send_signal(how)  # the launcher sends it on to the workers, one after the other


@gloo
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, "rank 1 killed"])
def test_two_processes_stopped_by_a_signal_say_where_to_resume(setup, tmp_path, sig):
    """SIGTERM (a batch scheduler's stop, sent on by the launcher) or Ctrl-C (SIGINT to the whole process group) in a
    2-process run: the processes vanished (SIGTERM) or stopped silently, with nothing in train.log saying which
    checkpoint a one-process `--resume` goes on from. When the other worker stopped first, the main process's
    collective failed (gloo: connection closed by peer) and it ended with that traceback instead (CI, once)."""
    import time

    _, recipe, _ = setup
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate" / "cpu_ddp.yaml"),
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), "-m", "peft_ft", "run", str(recipe),
           "--set", f"output.dir={tmp_path}", "--set", "train.checkpoint_every=2", "--set", "train.epochs=200"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True) as proc:
        try:
            deadline = time.monotonic() + 120
            while not list(tmp_path.glob("dp/*/checkpoints/step-*")) and time.monotonic() < deadline:
                time.sleep(0.2)
            _stop(proc, sig)
            _, err = proc.communicate(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    (run_dir,) = (tmp_path / "dp").iterdir()
    log = (run_dir / "train.log").read_text()
    assert proc.returncode != 0 and "interrupted: the newest checkpoint is step-" in log, log[-2000:] + err[-2000:]
    assert f"continue with `peft-ft run --resume {run_dir}` (in one process)" in log
    if sig == "rank 1 killed":
        assert "another process of this run stopped: " in log and " by peer" in log, log[-2000:] + err[-2000:]
        assert "interrupted: another process of this run stopped; the newest checkpoint is step-" in err
        assert "[rank0]" not in err, err[-3000:]  # no traceback of gloo's from the main process


def test_a_collective_failing_for_a_gone_process_is_told_from_other_errors(monkeypatch):
    gloo_message = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                    "[127.0.0.1]:29060. This is typically caused by a remote worker crashing.")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.lost_peer(RuntimeError(gloo_message))
    assert distributed.lost_peer(RuntimeError("[pair.cc:600] Read error [127.0.0.1]: Connection reset by peer"))
    assert not distributed.lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not distributed.lost_peer(ValueError(gloo_message))
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process has no peer to lose
    assert not distributed.lost_peer(RuntimeError(gloo_message))


def test_world_defaults_to_one_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.world() == distributed.World(1, 0, 0, 1) and distributed.is_main()
    assert distributed.gather_rows(lambda rows: [r * 2 for r in rows], [1, 2, 3]) == [2, 4, 6]
    assert distributed.broadcast_object("x") == "x"
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(PeftFtError, match="WORLD_SIZE='two'"):
        distributed.world()


def test_resume_with_several_processes_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PeftFtError, match="several processes is not supported"):
        resume(tmp_path)


@pytest.mark.parametrize("command", ["compare", "predict", "serve", "merge"])
def test_commands_that_are_not_training_refuse_several_processes(monkeypatch, capsys, tmp_path, command):
    from peft_ft.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = {"compare": ["compare", "r.toml"], "predict": ["predict", "--adapter", f"a={tmp_path}"],
            "serve": ["serve", "--adapter", f"a={tmp_path}"], "merge": ["merge", str(tmp_path), "--out", str(tmp_path / "m")]}[command]
    assert main(argv) == 2
    assert f"`peft-ft {command}` runs as one process" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


class FakeAccelerator:
    """What `forward_backward` asks of accelerate, without processes: DDP's exchange is simulated by the test."""

    def backward(self, loss):
        loss.backward()

    def no_sync(self, model):
        return contextlib.nullcontext()

    def reduce(self, value, reduction):
        return value * distributed.world().size  # the test sums the ranks' shares itself; undo the mean


def tiny_model_and_rows(token_labels: bool, lengths=(5, 3, 7, 2, 6)):
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    model = (BertForTokenClassification if token_labels else BertForSequenceClassification)(config)
    rows = []
    for n in lengths:
        ids = torch.randint(5, 30, (n,)).tolist()
        labels = [-100] + torch.randint(0, 3, (n - 1,)).tolist() if token_labels else int(torch.randint(0, 3, ()))
        rows.append({"input_ids": ids, "labels": labels, "length": n})
    return model, rows


def gradients(model):
    import torch

    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("token_labels", [False, True])
def test_weighted_shares_give_the_whole_batch_gradient(monkeypatch, token_labels):
    """Two simulated processes: DDP's mean of the weighted share gradients is the one-process gradient,
    for row losses and for token losses (where the shares hold different numbers of label tokens)."""
    import torch

    from peft_ft.engine import train

    model, rows = tiny_model_and_rows(token_labels)  # 5 rows: shares of 3 and 2 rows, unequal token counts
    whole_loss = train.forward_backward(model, rows, 0, "cpu", FakeAccelerator())
    whole = gradients(model)
    summed, share_losses = [torch.zeros_like(g) for g in whole], []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: distributed.World(2, rank, rank, 2))
        share_losses.append(train.forward_backward(model, rows, 0, "cpu", FakeAccelerator()))
        summed = [s + g for s, g in zip(summed, gradients(model))]
    assert sum(share_losses) / 2 == pytest.approx(whole_loss, rel=1e-5)  # each rank's loss is its share x 2
    for s, w in zip(summed, whole):
        torch.testing.assert_close(s / 2, w, rtol=1e-4, atol=1e-6)  # DDP averages over the 2 processes


def test_an_empty_share_still_runs_backward_with_a_zero_gradient(monkeypatch):
    """One row, two processes: rank 1 has nothing to train on but must still join DDP's exchange."""
    from peft_ft.engine import train

    model, rows = tiny_model_and_rows(False, lengths=(4,))
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(2, 1, 1, 2))
    calls = []
    fake = FakeAccelerator()
    fake.backward = lambda loss: (calls.append(loss.item()), loss.backward())
    assert train.forward_backward(model, rows, 0, "cpu", fake) == 0.0
    assert calls == [0.0]
    assert all(float(g.abs().max()) == 0.0 for g in gradients(model))


@pytest.mark.parametrize("token_labels", [False, True])
def test_accumulation_4_x_8_equals_1_x_32(token_labels):
    """Gradient accumulation through a real Accelerator: 4 micro-batches of 8 rows give the gradient and
    loss of one batch of 32 (each micro-batch weighted by its share of the label tokens)."""
    import torch

    from peft_ft.engine import train
    from peft_ft.engine.accelerator import make_accelerator
    from peft_ft.recipe.load import build_recipe

    model, rows = tiny_model_and_rows(token_labels, lengths=[3 + i % 9 for i in range(32)])
    accelerator = make_accelerator(build_recipe({"data": {"train": "t.jsonl"}, "train": {"device": "cpu"}}, "r.toml"))
    one_loss = train.forward_backward(model, rows, 0, "cpu", accelerator, micro_batch=32)
    one = gradients(model)
    four_loss = train.forward_backward(model, rows, 0, "cpu", accelerator, micro_batch=8)
    four = gradients(model)
    assert four_loss == pytest.approx(one_loss, rel=1e-6)
    assert any(float(g.abs().max()) > 0 for g in one)
    for a, b in zip(one, four):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@gloo
def test_fsdp_config_is_accepted_on_cpu_and_runs_data_parallel(setup):
    """accelerate shards models on GPUs only: with configs/accelerate/fsdp.yaml, CPU processes train as
    DDP (README says so), and the run says so too."""
    tmp, recipe, _ = setup
    done = launch(recipe, "--set", f"output.dir={tmp / 'fsdp'}", "--set", "train.epochs=1", config="fsdp.yaml")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = next((tmp / "fsdp" / "dp").iterdir())
    log = (run_dir / "train.log").read_text()
    assert "accelerate shards models only on GPUs" in log and "data-parallel over 2 processes" in log
    assert (run_dir / "adapter_model.safetensors").is_file() and (run_dir / "metrics.json").is_file()


FSDP2_SCRIPT = """
import os, sys, types
import torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from peft import LoraConfig, get_peft_model
from torch.distributed.device_mesh import init_device_mesh
from transformers import BertConfig, BertForTokenClassification
from peft_ft.engine.accelerator import fit_fsdp_wrapping

torch.manual_seed(0)
config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3, vocab_size=100)
model = get_peft_model(BertForTokenClassification(config), LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]))
plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), distributed_type=types.SimpleNamespace(value="FSDP"),
    torch_device_mesh=init_device_mesh("cpu", (1,), mesh_dim_names=("dp_shard",)), device=torch.device("cpu"),
    parallelism_config=types.SimpleNamespace(fsdp_dim_names=["dp_shard"]), mixed_precision="no", is_main_process=True)
fit_fsdp_wrapping(accelerator, model)
print("blocks:", plugin.transformer_cls_names_to_wrap)
fsdp2_prepare_model(accelerator, model)
model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[0, 1, 2]])).loss.backward()
print("sharded:", sorted(type(m).__name__ for m in model.modules() if type(m).__name__.startswith("FSDP")))
"""


@gloo
def test_fsdp2_shards_a_bert_model_with_lora(tmp_path):
    """accelerate's FSDP2 preparation (the code a GPU run of configs/accelerate/fsdp.yaml goes through), here in one
    CPU process over gloo. BERT lists its embeddings block in `_no_split_modules`; accelerate sharded it and then the
    word embedding inside it again, which torch refused on an H200 (torch 2.11) and breaks the forward on CPU.
    `fit_fsdp_wrapping` names the blocks without it: each layer and the embedding are sharded once, and a LoRA
    model's forward and backward run."""
    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(free_port())], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "blocks: ['BertLayer']" in done.stdout
    assert "sharded: ['FSDPBertLayer', 'FSDPBertLayer', 'FSDPEmbedding', 'FSDPPeftModel']" in done.stdout


def test_fsdp_blocks_keep_an_explicit_choice():
    """Block classes named in the launcher's config (fsdp_transformer_layer_cls_to_wrap) are left as they are, and
    nothing changes outside FSDP2."""
    import types

    from accelerate.utils import FullyShardedDataParallelPlugin

    from peft_ft.engine.accelerator import fit_fsdp_wrapping

    def accelerator(plugin, kind="FSDP"):
        return types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), distributed_type=types.SimpleNamespace(value=kind))

    named = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                           transformer_cls_names_to_wrap=["BertLayer", "BertEmbeddings"])
    fit_fsdp_wrapping(accelerator(named), model=None)  # the model is not even looked at
    assert named.transformer_cls_names_to_wrap == ["BertLayer", "BertEmbeddings"]
    version1 = FullyShardedDataParallelPlugin(fsdp_version=1, auto_wrap_policy="transformer_based_wrap")
    fit_fsdp_wrapping(accelerator(version1), model=None)
    assert version1.transformer_cls_names_to_wrap is None
    fit_fsdp_wrapping(accelerator(None, kind="MULTI_GPU"), model=None)


@gloo
def test_bf16_frozen_base_trains_data_parallel(setup):
    """A bf16 frozen base (peft_ft.engine.precision) under DDP: its bf16 weights go through gloo's start-up
    broadcast, only the float32 trained weights through the gradient exchange; the adapter saved is float32."""
    from safetensors.torch import load_file

    tmp, recipe, _ = setup
    done = launch(recipe, "--set", f"output.dir={tmp / 'bf16'}", "--set", "train.epochs=1",
                  "--set", "train.mixed_precision=bf16")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = next((tmp / "bf16" / "dp").iterdir())
    log = (run_dir / "train.log").read_text()
    assert "data-parallel over 2 processes" in log and "frozen base in bfloat16" in log
    weights = load_file(str(run_dir / "adapter_model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}


@gloo
def test_deepspeed_zero3_in_one_cpu_process_trains_and_saves_the_same_adapter(setup, one_process):
    """configs/accelerate/deepspeed_zero3.yaml with one CPU process: accelerate runs DeepSpeed there (it does not
    on several CPU processes), so the ZeRO-3 path a GPU run takes is exercised here: DeepSpeed's engine built from
    our model and optimizer (it refuses a device_placement argument and needs the micro-batch size), the base loaded
    partitioned, the fused CPU layers left out, the adapter gathered and saved in peft's format. Without dropout the
    run equals the plain one-process run to float rounding."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed)")
    tmp, recipe, _ = setup
    done = launch(recipe, "--set", f"output.dir={tmp / 'zero3'}", config="deepspeed_zero3.yaml",
                  launcher=("--num_processes", "1"), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = next((tmp / "zero3" / "dp").iterdir())
    log = (run_dir / "train.log").read_text()
    assert "accelerate: DEEPSPEED over 1 process" in log and "fast kernels" not in log
    # no JIT build of DeepSpeed's CPU shared-memory all-reduce for one process (114 s on 2 cores before)
    assert "deepspeed_shm_comm_op built successfully" not in done.stdout + done.stderr
    plain = (one_process / "train.log").read_text()
    counts = [line.split("method lora: ")[1] for text in (log, plain) for line in text.splitlines() if "method lora: " in line]
    assert counts[0] == counts[1] and "7,746 trainable of 46,052" in counts[0]  # partitioned weights counted whole
    assert_same_run(one_process, run_dir)


@gloo
def test_deepspeed_zero3_bf16_trains_16_bit_weights_and_saves_a_float32_adapter(setup):
    """bf16 under DeepSpeed: the base loads partitioned in bf16 and peft makes the adapter float32 afterwards, which
    ZeRO-3 refuses (deepspeedai/DeepSpeed#8072) unless the adapter is made bf16 too before DeepSpeed takes the
    model (its optimizer keeps float32 masters). The adapter is saved float32, as in every other mode."""
    from safetensors.torch import load_file

    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed)")
    tmp, recipe, _ = setup
    done = launch(recipe, "--set", f"output.dir={tmp / 'zero3-bf16'}", "--set", "train.epochs=2",
                  "--set", "train.mixed_precision=bf16", config="deepspeed_zero3.yaml",
                  launcher=("--num_processes", "1"), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = next((tmp / "zero3-bf16" / "dp").iterdir())
    assert "precision bf16 (DeepSpeed" in (run_dir / "train.log").read_text()
    weights = load_file(str(run_dir / "adapter_model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32} and any("lora_A" in n for n in weights)


@gloo
def test_deepspeed_config_with_several_cpu_processes_trains_data_parallel(setup):
    """Several CPU processes under a DeepSpeed config: accelerate would count one process where DeepSpeed's group
    counts two, so the run stays DDP and says so, as with FSDP on CPU."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed: accelerate's launcher needs it for this config")
    tmp, recipe, _ = setup
    done = launch(recipe, "--set", f"output.dir={tmp / 'ds2'}", "--set", "train.epochs=1", config="deepspeed_zero3.yaml")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (next((tmp / "ds2" / "dp").iterdir()) / "train.log").read_text()
    assert "asks for DeepSpeed, which accelerate runs on CPU with one process only" in log
    assert "data-parallel over 2 processes" in log


def test_deepspeed_and_gpu_configs_are_valid_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"single_gpu.yaml": ("NO", 1), "multi_gpu_ddp.yaml": ("MULTI_GPU", 2), "cpu_ddp.yaml": ("MULTI_GPU", 2),
                "fsdp.yaml": ("FSDP", 2), "deepspeed_zero3.yaml": ("DEEPSPEED", 2)}
    for name, (kind, processes) in expected.items():
        config = load_config_from_file(str(REPO / "configs" / "accelerate" / name))
        assert (config.distributed_type.value, config.num_processes) == (kind, processes), name
    zero3 = load_config_from_file(str(REPO / "configs" / "accelerate" / "deepspeed_zero3.yaml"))
    assert zero3.deepspeed_config["zero_stage"] == 3 and zero3.deepspeed_config["zero3_save_16bit_model"]
    assert zero3.deepspeed_config["gradient_accumulation_steps"] == 1  # the loop refuses its own accumulation under DeepSpeed


@pytest.mark.parametrize("flag", [False, True])
def test_zero3_loads_the_model_whole_unless_the_config_asks_for_partitioned_loading(flag):
    """accelerate points transformers at its ZeRO-3 config whatever `zero3_init_flag` says, so every ZeRO-3 model
    was loaded partitioned; on a GPU its fresh head then came from the CUDA generator, another head than a plain run
    with the same seed (an H200). The flag is honoured for the load, and accelerate's setting is back after it."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed)")
    from types import SimpleNamespace

    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    from peft_ft.engine.accelerator import zero3_init_as_configured

    plugin = DeepSpeedPlugin(zero_stage=3, zero3_init_flag=flag)
    plugin.set_deepspeed_weakref()
    accelerator = SimpleNamespace(distributed_type=SimpleNamespace(value="DEEPSPEED"),
                                  state=SimpleNamespace(deepspeed_plugin=plugin))
    try:
        assert is_deepspeed_zero3_enabled()  # what transformers sees from accelerate, the flag aside
        with zero3_init_as_configured(accelerator):
            assert is_deepspeed_zero3_enabled() is flag
        assert is_deepspeed_zero3_enabled()
    finally:
        unset_hf_deepspeed_config()
