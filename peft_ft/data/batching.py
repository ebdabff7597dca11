"""Batch order and padding.

Why our own instead of a DataLoader + DataCollatorWithPadding: on 2 CPU cores the per-step Python
overhead of those is a visible share of a step, and padding waste is the largest cost of all.
Features are token-id lists made once per split; a batch is padded only to its own longest row.
"""

from __future__ import annotations

import random

# Length grouping sorts within windows of this many batches: long enough to make batches uniform
# in length, short enough that the order stays random across the epoch.
GROUP_WINDOW = 50


def train_batches(lengths: list[int], batch_size: int, *, group_by_length: bool, seed: int, epoch: int) -> list[list[int]]:
    """Row indices for one epoch: every row exactly once, order fixed by (seed, epoch)."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * GROUP_WINDOW
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def eval_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Sorted by length so each batch pads little; results are put back in row order by the caller."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padded_width(width: int, multiple: int = 1, max_width: int = 0) -> int:
    """`width` rounded up to a multiple of `multiple`, but never past `max_width` (when set); a field already past it
    (a seq2seq target longer than model.max_length) keeps its own width."""
    rounded = -(-width // multiple) * multiple
    return min(rounded, max(width, max_width)) if max_width else rounded


def pad_batch(features: list[dict], pad_id: int, label_pad: int = -100, multiple: int = 1, max_width: int = 0):
    """Pad list-valued fields to the longest row and stack everything into tensors.

    `input_ids` pads with the tokenizer's pad id, `labels` (when a list) with -100 so the loss
    ignores it, everything else with 0; `attention_mask` is built from the lengths. Keys starting
    with `_` (and `length`) are a task's bookkeeping (offsets, example ids) and stay out of the batch.
    `multiple` (train.pad_to_multiple_of) rounds each field's width up, capped at `max_width`
    (`padded_width`): fewer distinct tensor sizes for the allocator to fit into its freed memory.
    """
    import torch

    batch = {}
    for key in features[0]:
        if key == "length" or key.startswith("_"):
            continue
        values = [f[key] for f in features]
        if isinstance(values[0], list):
            # Each field to its own longest row: seq2seq targets are shorter (or longer) than inputs.
            fill = pad_id if key == "input_ids" else (label_pad if key == "labels" else 0)
            key_width = padded_width(max(len(v) for v in values), multiple, max_width)
            values = [v + [fill] * (key_width - len(v)) for v in values]
        batch[key] = torch.tensor(values)
    width = batch["input_ids"].shape[1]
    lengths = torch.tensor([len(f["input_ids"]) for f in features])
    batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return batch
