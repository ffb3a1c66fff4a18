"""Helpers for tests that need a small real model without training one."""

import random
from pathlib import Path

import torch

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


def teach_score_format(model, tok, heads: list[str], steps: int, seed: int = 0) -> None:
    """A few Adam steps teaching `model` to answer each chat-formatted judge prompt in `heads` with "Score: N" (N
    random), so a tiny model writes verdicts that parse: the format, not the judging. Leaves the model in eval mode."""
    rng = random.Random(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        rows = []
        for head in rng.sample(heads, 4):
            a = tok(head, add_special_tokens=False)["input_ids"]
            b = tok(f"Score: {rng.randint(0, 5)}{tok.eos_token}", add_special_tokens=False)["input_ids"]
            rows.append((a + b, [-100] * len(a) + b))
        width = max(len(ids) for ids, _ in rows)
        pad = [width - len(ids) for ids, _ in rows]
        ids = torch.tensor([[tok.pad_token_id] * n + x for n, (x, _) in zip(pad, rows)])
        labels = torch.tensor([[-100] * n + y for n, (_, y) in zip(pad, rows)])
        mask = torch.tensor([[0] * n + [1] * (width - n) for n in pad])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
