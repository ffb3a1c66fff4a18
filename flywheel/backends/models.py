"""Models: build a tiny one locally, load any one from a path or hub id, save one atomically.

The embedded default needs no download: `build_tokenizer` trains a byte-level BPE on local text and `build_tiny_model`
makes a small Llama-architecture model with random weights. Users' real models go through `load` (plain
`from_pretrained`), which is also how every stage loads the tiny models once they are saved.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..config import TinyModelConfig
from ..registry.base import dead_leftovers

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, the format of most open chat models. The {% generation %} markers let TRL find the assistant's tokens.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelNotFoundError(ValueError):
    """`load` was given a path that is no model folder (and no hub id)."""


def apply_threads(threads: int | None) -> int:
    """Set torch's CPU threads (`run.threads`): the given number, else OMP_NUM_THREADS when set, else the machine's
    cores. Returns the number in force."""
    n = threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def build_tokenizer(texts: list[str], vocab_size: int, split_digits: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (every byte is in the alphabet, so any text encodes). With `split_digits`
    each digit is a token of its own, so no merge hides a number's digits."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token=None,
        padding_side="left",  # set here, not afterwards: only constructor arguments are saved
        chat_template=CHAT_TEMPLATE,
        model_max_length=1_000_000,
    )


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def load(path: str | Path, device: str = "cpu", train: bool = False):
    """(model, tokenizer) from a saved folder or a hub id, left padding, bfloat16 on CUDA. The one model loader.
    For generation (default): on `device`, eval mode. For training (`train=True`): left on the CPU in train mode,
    since the Trainer (or DeepSpeed) places it, one device per process under `accelerate launch`. A path that is
    neither a folder nor shaped like a hub id (owner/name) is refused here, rather than sent to the hub. (A registered
    model's path comes from `flywheel.registry.integrity.model_path`, which has checked its weights.)"""
    if not Path(path).is_dir() and not _HUB_ID.fullmatch(str(path)):
        raise ModelNotFoundError(f"model folder {path} does not exist (nor is it a hub id, owner/name)")
    tokenizer = AutoTokenizer.from_pretrained(str(path), padding_side="left")
    if tokenizer.pad_token is None:  # many base models ship without one
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    if not train:
        model = model.to(device).eval()
    return model, tokenizer


def save_atomically(model, tokenizer, final_dir: Path) -> None:
    """Write to a sibling temp folder and rename it into place, so a killed process never leaves a half model there."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.with_name(f".{final_dir.name}.tmp-{os.getpid()}")
    for left in [tmp, *dead_leftovers(final_dir.parent, f".{final_dir.name}.tmp-*")]:  # a killed earlier attempt's
        if left.exists():
            shutil.rmtree(left)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if final_dir.exists():  # left by a run killed between rename and registration: same key, same content
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)
