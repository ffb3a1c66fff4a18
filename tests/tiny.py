"""Helpers for tests that need a small real model without training one."""

from pathlib import Path

from flywheel.config import TinyModelConfig
from flywheel.models import build_tiny_model, build_tokenizer, save_atomically
from flywheel.seeds import load_seeds, pretrain_corpus

TINY = TinyModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       max_position=512, pretrain_steps=0)


def save_random_tiny_model(path: Path, seed: int = 0) -> Path:
    """A tokenizer trained on the shipped seeds and a randomly initialised tiny Llama, saved like any model."""
    corpus = pretrain_corpus(load_seeds("seeds/demo.jsonl"), [], seed)
    tokenizer = build_tokenizer(corpus, TINY.vocab_size)
    save_atomically(build_tiny_model(TINY, tokenizer, seed), tokenizer, path)
    return path
