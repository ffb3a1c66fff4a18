"""The one tiny-model factory: a tokenizer trained on the shipped seeds, tiny random Llamas (TINY, or TINY with some
sizes changed), saved like any model, taught the judge's "Score: N" format; and the overrides of a tiny real run."""

import random
from pathlib import Path

import torch

from flywheel.backends.models import build_tiny_model, build_tokenizer, save_atomically
from flywheel.config import TinyModelConfig
from flywheel.stages.seeds import load_seeds, pretrain_corpus
from tests.helpers import REPO

TINY = TinyModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       max_position=512, pretrain_steps=0)


def seed_tokenizer(vocab_size: int = TINY.vocab_size, seed: int = 0):
    """A byte-level BPE trained on the shipped seeds (seeds/demo.jsonl), as a tiny base model's is."""
    return build_tokenizer(pretrain_corpus(load_seeds(REPO / "seeds/demo.jsonl"), [], seed), vocab_size)


def tiny_model(tokenizer, seed: int = 0, **sizes):
    """A randomly initialised tiny Llama for `tokenizer`: TINY, with any of its fields replaced by `sizes`."""
    return build_tiny_model(TinyModelConfig(**{**TINY.model_dump(), **sizes}), tokenizer, seed)


def save_random_tiny_model(path: Path, seed: int = 0, **sizes) -> Path:
    """A seed-trained tokenizer and a random tiny Llama (TINY, or TINY with `sizes`), saved like any model."""
    vocab = sizes.get("vocab_size", TINY.vocab_size)
    tokenizer = seed_tokenizer(vocab, seed)
    save_atomically(tiny_model(tokenizer, seed, **sizes), tokenizer, path)
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


# --- a tiny real run: seeds -> PT -> M1 -> one iteration, each stage as small as it goes --------------------------
TINY_RUN = [
    "run.device=cpu", "run.iterations=1", "seeds.eft=false",
    "model.tiny.vocab_size=400", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
    "model.tiny.num_layers=1", "model.tiny.pretrain_steps=0", "model.tiny.max_position=256",
    "sft.epochs=1", "sft.batch_size=8", "sft.max_length=128",
    "self_instruct.num_prompts=24", "self_instruct.batch_size=6", "self_instruct.few_shot=2",
    "self_instruct.seed_shots=2", "self_instruct.max_new_tokens=16", "self_instruct.dedup_threshold=1.0",
    "generate.n=2", "generate.max_new_tokens=12", "generate.batch_size=2",
    "judge.samples=2", "judge.max_new_tokens=8", "judge.batch_size=3",
    "reward.coherent=true", "reward.weights={judge: 0.0, coherent: 1.0}", "reward.batch_size=8",
    "dpo.epochs=1", "dpo.batch_size=8", "dpo.max_length=128",
]


def tiny_overrides(folder: Path, registry: Path) -> list[str]:
    """TINY_RUN plus a 12-seed file and a one-line judge template written in `folder`, and the registry's path."""
    seeds = (REPO / "seeds/demo.jsonl").read_text().splitlines()[:12]
    (folder / "seeds.jsonl").write_text("\n".join(seeds) + "\n")
    (folder / "judge.txt").write_text("Grade the reply from 0 to 5.\nQuestion: {instruction}\nReply: {response}\n")
    return TINY_RUN + [f"registry.root={registry}", f"seeds.path={folder / 'seeds.jsonl'}",
                       f"judge.template={folder / 'judge.txt'}"]
