"""Generation backends behind one interface: prompts in, N sampled completions per prompt out.

Stages never touch a model's generate() directly; they ask `make_backend(cfg.generate.backend, ...)` for a backend
and call `generate`. The transformers backend runs anywhere (CPU or GPU). Backends that cannot run on this
machine (vLLM is CUDA-only) are imported lazily inside their own class, so the library imports without them.
"""

from __future__ import annotations

import gc
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import torch

from . import timing


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Generation:
    text: str
    num_tokens: int
    finish_reason: str  # "stop" (end-of-turn token) or "length" (hit max_new_tokens)


class GenerationBackend(ABC):
    name: str

    @abstractmethod
    def generate(
        self, prompts: list[str], params: SamplingParams, *, seed: int, chat: bool
    ) -> list[list[Generation]]:
        """For each prompt, `params.n` completions. chat=True wraps each prompt as one user turn of the model's
        chat template; chat=False continues the raw text (few-shot completion)."""


class TransformersBackend(GenerationBackend):
    """Batched `model.generate` with left padding; one seed per call makes a batch reproducible."""

    name = "transformers"

    def __init__(self, model_path: str, device: str = "cpu"):
        from .models import load

        self.device = device
        self.model, self.tokenizer = load(model_path, device)

    def _format(self, prompt: str, chat: bool) -> str:
        if not chat:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.inference_mode()
    def generate(self, prompts, params, *, seed, chat):
        tok = self.tokenizer
        enc = tok([self._format(p, chat) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(self.device)
        torch.manual_seed(seed)
        sample = params.temperature > 0
        with timing.compute():
            out = self.model.generate(
            **enc,
                do_sample=sample,
                temperature=params.temperature if sample else None,
                top_p=params.top_p if sample else None,
                top_k=None,
                max_new_tokens=params.max_new_tokens,
                num_return_sequences=params.n,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        new_tokens = out[:, enc["input_ids"].shape[1] :].tolist()
        results: list[list[Generation]] = []
        for i, ids in enumerate(new_tokens):
            if tok.eos_token_id in ids:
                ids, reason = ids[: ids.index(tok.eos_token_id)], "stop"
            else:
                ids, reason = [t for t in ids if t != tok.pad_token_id], "length"
            gen = Generation(tok.decode(ids, skip_special_tokens=True).strip(), len(ids), reason)
            if i % params.n == 0:
                results.append([])
            results[-1].append(gen)
        return results


BACKENDS = {"transformers": TransformersBackend}

# One backend kept loaded between stages: self-instruct, generate and judge all use M_t, so M_t loads once per
# iteration. Training stages call release_backends() first, so the generation copy does not hold their memory.
_loaded: tuple[tuple, GenerationBackend] | None = None


def make_backend(gen, model_path: str, device: str) -> GenerationBackend:
    """`gen` is the config's `generate` section (GenerateConfig)."""
    global _loaded
    name = gen.backend
    if name not in BACKENDS:
        raise ValueError(f"unknown generation backend {name!r}; available: {', '.join(BACKENDS)}")
    key = (name, str(model_path), device)
    if _loaded is None or _loaded[0] != key:
        release_backends()
        _loaded = (key, BACKENDS[name](model_path, device))
    return _loaded[1]


def release_backends() -> None:
    global _loaded
    _loaded = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
