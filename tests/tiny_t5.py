"""A tiny T5 (2+2 layers, d_model 32) and a word-level tokenizer, built in code and saved like a checkpoint.

The tokenizer reuses the conftest words with T5's conventions: pad = 0 (also the decoder start),
eos `</s>` appended to every text, lower-cased, punctuation split off.
"""

from __future__ import annotations

from pathlib import Path

from conftest import WORDS

T5_VOCAB = ["<pad>", "</s>", "<unk>", "question", "context", ":"] + WORDS


def write_tiny_t5_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(T5_VOCAB)}, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    core.decoder = decoders.WordPiece(cleanup=False)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(path)
    return tokenizer


def write_tiny_t5(path: Path) -> Path:
    """T5ForConditionalGeneration with random weights and its tokenizer in `path`."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    write_tiny_t5_tokenizer(path)
    config = T5Config(
        vocab_size=len(T5_VOCAB), d_model=32, d_ff=64, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    T5ForConditionalGeneration(config).save_pretrained(path)
    return path
