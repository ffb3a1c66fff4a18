"""Generation backends behind one interface: prompts in, N sampled completions per prompt out.

    backend = make_backend(cfg.generate, model_path, device)     # what stage.backend_for does
    outs = backend.generate(prompts, SamplingParams(n=4), seed=123, chat=True)   # outs[i][j]: Generation
    probs = backend.choice_probs(prompts, "Score:", ["0", "1"], batch_size=8)   # next-token probs (transformers)

Stages never touch a model's generate() directly. `generate.backend` picks one of:

- `transformers`: batched `model.generate` in this process (CPU or GPU), the default;
- `vllm`: offline `vllm.LLM` in this process (CUDA only; `pip install -e ".[vllm]"`);
- `openai`: HTTP to any OpenAI-compatible server (vLLM serve, SGLang, TGI, a hosted API, `flywheel serve`), with a
  concurrency limit, retries with exponential backoff, and the API key read from the environment (never logged).
- `ray`: a pool of actors on a Ray cluster, each running the transformers or vLLM engine (the `ray` section;
  flywheel/backends/ray_data.py, `pip install -e ".[ray]"`).

Backends that cannot run on this machine are imported lazily inside their own class, so the library imports without
them. One backend stays loaded between stages (see `make_backend`).
"""

from __future__ import annotations

import gc
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import httpx
import torch

from .. import timing
from ..config import ConfigError, OpenAIBackendConfig, VLLMBackendConfig, content_hash

log = logging.getLogger("flywheel")


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

    def choice_probs(
        self, prompts: list[str], prefix: str, choices: list[str], *, batch_size: int
    ) -> list[list[float]]:
        """For each prompt (one user turn, its reply begun with `prefix`), the probability that the reply goes on
        with each choice (with or without a leading space, summed); raw, not renormalised over the choices."""
        raise NotImplementedError(f"the {self.name} backend gives no next-token probabilities; judge.mode=prob needs "
                                  "generate.backend=transformers")

    def close(self) -> None:
        """Free what the backend holds (connections, GPU memory); called when the loaded backend is replaced."""


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
    def generate(self, prompts, params, *, seed, chat, stop: Callable[[], bool] | None = None):
        """As GenerationBackend.generate; `stop`, if given, is called after every new token, and once it returns True
        generation ends there: the texts so far come back, those not ended by the end-of-turn token as "length"."""
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
                stopping_criteria=_stop_criteria(stop) if stop is not None else None,
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

    def _choice_tokens(self, choices: list[str]) -> tuple[list[list[int]], list[int | None], int | None]:
        """How the reply can continue with each choice, with or without a leading space: (per choice, the distinct
        ids of the single tokens that begin it, such as "3" and " 3"; per choice, the id that follows a bare space
        token where the tokenizer writes " 3" as " " + "3", else None; that space token's id, or None if unused)."""
        tok = self.tokenizer
        space = tok.encode(" ", add_special_tokens=False)
        space = space[0] if len(space) == 1 else None
        direct, after_space = [], []
        for choice in choices:
            word, ids, split = choice.strip(), [], None
            for variant in (word, " " + word):
                enc = tok.encode(variant, add_special_tokens=False)
                if enc and tok.decode(enc[:1]).strip() == word:
                    if enc[0] not in ids:
                        ids.append(enc[0])
                elif len(enc) > 1 and enc[0] == space and tok.decode(enc[1:2]).strip() == word:
                    split = enc[1]
            if not ids and split is None:
                raise ValueError(f"choice {choice!r} does not begin with a token of its own in this tokenizer")
            direct.append(ids)
            after_space.append(split)
        return direct, after_space, space if any(i is not None for i in after_space) else None

    @torch.inference_mode()
    def choice_probs(self, prompts, prefix, choices, *, batch_size):
        """One forward pass per batch. p(choice) = p(its single tokens | prefix), plus, where the tokenizer writes
        " 3" as a space token then "3", p(space | prefix) * p("3" | prefix + space): the space token is appended to
        every input, so both come from the same pass (its last two positions)."""
        tok = self.tokenizer
        direct, after_space, space = self._choice_tokens(choices)
        flat = torch.tensor([i for ids in direct for i in ids], dtype=torch.long, device=self.device)
        owner = torch.tensor([c for c, ids in enumerate(direct) for _ in ids], dtype=torch.long, device=self.device)
        split = [c for c, i in enumerate(after_space) if i is not None]
        split_ids = torch.tensor([after_space[c] for c in split], dtype=torch.long, device=self.device)
        tail = [space] if space is not None else []
        results: list[list[float]] = []
        for start in range(0, len(prompts), batch_size):
            rows = [tok(self._format(p, chat=True) + prefix, add_special_tokens=False)["input_ids"] + tail
                    for p in prompts[start : start + batch_size]]
            width = max(len(r) for r in rows)  # padded on the left here, so the last positions are real tokens
            ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows], device=self.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate does: padding takes no position
            with timing.compute():
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                    logits_to_keep=1 + len(tail)).logits.float()
                first = torch.softmax(logits[:, 0], dim=-1)  # the next token after the prefix, over the vocabulary
                probs = torch.zeros(len(rows), len(choices), device=self.device).index_add_(1, owner, first[:, flat])
                if split:
                    after = torch.softmax(logits[:, 1], dim=-1)  # the next token after prefix + space
                    probs[:, split] += first[:, space, None] * after[:, split_ids]
                results += probs.cpu().tolist()
        return results


def _stop_criteria(stop: Callable[[], bool]):
    """A transformers StoppingCriteriaList that ends every sequence of the batch once `stop()` returns True."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopWhen(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), bool(stop()), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopWhen()])


class BackendError(RuntimeError):
    """A generation request that failed for good: the message names the URL, the status and the server's reason."""


# finish_reason spellings of OpenAI-compatible servers (TGI says eos_token / stop_sequence); others are kept as sent.
_FINISH = {"stop": "stop", "eos_token": "stop", "stop_sequence": "stop", "eos": "stop", "length": "length",
           "max_tokens": "length"}
_MAX_WAIT_S = 600.0  # the longest single wait between retries, whatever Retry-After says


class OpenAIBackend(GenerationBackend):
    """Any OpenAI-compatible HTTP server. chat=True posts to {base_url}/chat/completions with one user message,
    chat=False to {base_url}/completions. One request per prompt (with `n`), at most `max_concurrency` in flight;
    429, 5xx, timeouts and connection errors are retried with exponential backoff (or the server's Retry-After).

    Each prompt gets its own seed, derived from the batch seed and its position, so a batch is reproducible on a server
    that honours `seed` (vLLM, `flywheel serve`). The API key is read from the environment variable
    `cfg.api_key_env` on every call and held nowhere else; without it no Authorization header is sent.

    num_tokens per choice, in this order: the choice's own `usage.completion_tokens` when the server gives one (an
    extension `flywheel serve` provides; exact); else the response's `usage.completion_tokens` when n == 1 (exact);
    else, for n > 1 on servers that only report a total, choices cut at the limit count `max_tokens` (exact) and the
    rest of the total is shared among the other choices in proportion to their text length (an estimate whose sum is
    exact; a warning says so once).
    """

    name = "openai"

    def __init__(self, model_path: str, cfg: OpenAIBackendConfig | None = None):
        self.cfg = cfg or OpenAIBackendConfig()
        self.base_url = self.cfg.base_url.rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError("generate.openai.base_url must start with http:// or https://, "
                              f"got {self.cfg.base_url!r}")
        self.model = self.cfg.model or str(model_path)
        n = self.cfg.max_concurrency
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        self._client = httpx.Client(timeout=httpx.Timeout(self.cfg.timeout_s), limits=limits)
        self._warned_estimate = False

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r})"

    def close(self) -> None:
        self._client.close()

    def generate(self, prompts, params, *, seed, chat):
        key = os.environ.get(self.cfg.api_key_env) or None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        url = f"{self.base_url}/chat/completions" if chat else f"{self.base_url}/completions"
        bodies = []
        for i, prompt in enumerate(prompts):
            body = {"model": self.model, "n": params.n, "temperature": params.temperature, "top_p": params.top_p,
                    "max_tokens": params.max_new_tokens, "seed": prompt_seed(seed, i)}
            body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
            bodies.append(body)
        pool = ThreadPoolExecutor(max_workers=min(self.cfg.max_concurrency, max(1, len(prompts))))
        try:
            with timing.compute():
                futures = [pool.submit(self._post, url, body, headers, key) for body in bodies]
                responses = [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return [self._parse(url, r, params, chat, key) for r in responses]

    def _post(self, url: str, body: dict, headers: dict, key: str | None) -> dict:
        attempts = self.cfg.max_retries + 1
        for attempt in range(attempts):
            retry_after = None
            try:
                r = self._client.post(url, json=body, headers=headers)
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as e:
                problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            except httpx.HTTPError as e:  # not transient (a malformed URL, an unsupported protocol...)
                raise BackendError(_scrub(f"POST {url} failed: {type(e).__name__}: {e}", key)) from None
            else:
                if r.status_code < 400:
                    try:
                        return r.json()
                    except ValueError:
                        raise BackendError(_scrub(f"POST {url} -> HTTP {r.status_code} but the body is not JSON: "
                                                  f"{r.text[:200]!r}", key)) from None
                problem = f"HTTP {r.status_code}: {_reason(r)}"
                if r.status_code != 429 and r.status_code < 500:  # our request is wrong: retrying will not help
                    hint = (f" (the model sent is {self.model!r}: set generate.openai.model, or serve the registered "
                            "model's path)" if r.status_code == 404 else "")
                    raise BackendError(_scrub(f"POST {url} -> {problem}{hint}", key)) from None
                retry_after = _retry_after(r)
            if attempt == attempts - 1:
                raise BackendError(_scrub(f"POST {url} failed after {attempts} attempt(s); last error: {problem}", key))
            wait = min(retry_after if retry_after is not None else self.cfg.backoff_s * 2**attempt, _MAX_WAIT_S)
            log.warning("%s", _scrub(f"POST {url}: {problem}; retry {attempt + 1}/{attempts - 1} in {wait:.2f} s", key))
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _parse(self, url: str, response: dict, params: SamplingParams, chat: bool, key: str | None) -> list[Generation]:
        choices = sorted(response.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != params.n:
            raise BackendError(_scrub(f"POST {url} returned {len(choices)} choice(s) for n={params.n}; the server may "
                                      "not support n > 1", key))
        texts = [(((c.get("message") or {}).get("content") if chat else c.get("text")) or "").strip() for c in choices]
        reasons = [_FINISH.get(c.get("finish_reason"), c.get("finish_reason") or "stop") for c in choices]
        counts = self._token_counts(choices, texts, reasons, response.get("usage") or {}, params)
        return [Generation(t, n, r) for t, n, r in zip(texts, counts, reasons)]

    def _token_counts(self, choices, texts, reasons, usage, params) -> list[int]:
        per_choice = [(c.get("usage") or {}).get("completion_tokens") for c in choices]
        if all(isinstance(n, int) for n in per_choice):
            return per_choice
        total = usage.get("completion_tokens")
        if not isinstance(total, int):
            raise BackendError("the server's response has no usage.completion_tokens; num_tokens cannot be known")
        if len(choices) == 1:
            return [total]
        if not self._warned_estimate:
            self._warned_estimate = True
            log.warning("openai backend: the server reports only a total token count for n=%d; per-candidate "
                        "num_tokens of non-truncated choices are estimated from text length", params.n)
        counts = [params.max_new_tokens if r == "length" else None for r in reasons]
        rest = max(0, total - sum(n for n in counts if n is not None))
        free = [i for i, n in enumerate(counts) if n is None]
        weights = [len(texts[i]) or 1 for i in free]
        for i, w in zip(free, weights):
            counts[i] = rest * w // sum(weights)
        if free:  # what integer division left over, so the counts add up to the server's total
            counts[free[-1]] += rest - sum(counts[i] for i in free)
        return counts


def prompt_seed(batch_seed: int, index: int) -> int:
    """The seed sent with prompt `index` of a batch: fixed by (batch seed, position), within 31 bits for any server."""
    return int(content_hash([batch_seed, index], 8), 16) & 0x7FFFFFFF


def _reason(r) -> str:
    """The server's own words for a failed request (OpenAI-style `error.message`, FastAPI's `detail`, or the text)."""
    try:
        body = r.json()
    except ValueError:
        return r.text[:300] or r.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if body.get("detail"):
            return str(body["detail"])
    return str(body)[:300]


def _retry_after(r) -> float | None:
    """Retry-After in seconds (a number or an HTTP date), or None when absent or unreadable."""
    value = r.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _scrub(text: str, key: str | None) -> str:
    """Never let the API key reach a message, even when a server echoes it back."""
    return text.replace(key, "***") if key else text


class VLLMBackend(GenerationBackend):
    """Offline vLLM on a local model (CUDA only). Prompts are formatted and tokenized as the transformers backend does
    (the chat template for chat=True, no added special tokens) and sent as token ids, one seed per prompt."""

    name = "vllm"

    def __init__(self, model_path: str, cfg: VLLMBackendConfig | None = None):
        try:
            import vllm
        except ImportError as e:
            raise _no_vllm(e) from None
        cfg = cfg or VLLMBackendConfig()
        self._vllm = vllm
        self.llm = vllm.LLM(model=str(model_path), tensor_parallel_size=cfg.tensor_parallel_size,
                            gpu_memory_utilization=cfg.gpu_memory_utilization, dtype=cfg.dtype,
                            max_model_len=cfg.max_model_len, seed=0)
        self.tokenizer = self.llm.get_tokenizer()

    def _format(self, prompt: str, chat: bool) -> str:
        if not chat:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, prompts, params, *, seed, chat):
        inputs = [{"prompt_token_ids": self.tokenizer.encode(self._format(p, chat), add_special_tokens=False)}
                  for p in prompts]
        sampling = [self._vllm.SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                              max_tokens=params.max_new_tokens, seed=prompt_seed(seed, i))
                    for i in range(len(prompts))]
        with timing.compute():
            outputs = self.llm.generate(inputs, sampling, use_tqdm=False)
        eos = self.tokenizer.eos_token_id
        results = []
        for out in outputs:
            gens = []
            for o in sorted(out.outputs, key=lambda o: o.index):
                ids = list(o.token_ids)
                if ids and ids[-1] == eos:  # count as the transformers backend does: without the end-of-turn token
                    ids = ids[:-1]
                gens.append(Generation(o.text.strip(), len(ids), _FINISH.get(o.finish_reason, o.finish_reason)))
            results.append(gens)
        return results

    def close(self) -> None:
        self.llm = None
        gc.collect()
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        except ImportError:
            return
        cleanup_dist_env_and_memory()


def _no_vllm(e: Exception) -> ConfigError:
    return ConfigError(
        f"generate.backend=vllm needs the vllm package, which cannot be imported here ({e}). On a CUDA machine "
        'install it with: pip install -e ".[vllm]"; elsewhere use generate.backend=transformers, or openai with a '
        "server")


def check_backend(gen, ray=None) -> None:
    """Fail before a run starts when the configured backend cannot run here (vllm not installed; for ray: ray not
    installed, the vllm engine without vllm, or nothing answering at the cluster's address); loads nothing.
    `ray`: the config's `ray` section (RayConfig), needed for generate.backend=ray."""
    import importlib.util

    needs_vllm = gen.backend == "vllm"
    if gen.backend == "ray":
        from .ray_data import cluster_address, import_ray, probe

        if ray is None:
            raise ValueError("check_backend(gen, ray=cfg.ray): generate.backend=ray needs the config's ray section")
        import_ray()
        needs_vllm = ray.engine == "vllm"
        address, setting = cluster_address(ray)
        if address:
            probe(address, setting)
    if needs_vllm and importlib.util.find_spec("vllm") is None:
        raise _no_vllm(ModuleNotFoundError("No module named 'vllm'"))


def _ray_backend(gen, path, device, ray):
    from .ray_data import RayBackend

    if ray is None:
        raise ValueError("make_backend(gen, path, device, ray=cfg.ray): generate.backend=ray needs the config's ray "
                         "section")
    return RayBackend(path, ray, gen.vllm)


BACKENDS = {
    "transformers": lambda gen, path, device, ray: TransformersBackend(path, device),
    "vllm": lambda gen, path, device, ray: VLLMBackend(path, gen.vllm),
    "openai": lambda gen, path, device, ray: OpenAIBackend(path, gen.openai),
    "ray": _ray_backend,  # where the engine runs (the actors) is the ray section's business, not `device`
}

# One backend kept loaded between stages: self-instruct, generate and judge all use M_t, so M_t loads once per
# iteration. Training stages call release_backends() first, so the generation copy does not hold their memory.
_loaded: tuple[tuple, GenerationBackend] | None = None


def make_backend(gen, model_path: str, device: str, ray=None) -> GenerationBackend:
    """The backend `gen.backend` on `model_path`, reused while (backend, its options, model, device) stay the same.
    `gen` is the config's `generate` section (GenerateConfig); `ray` its `ray` section (RayConfig), which
    generate.backend=ray needs (its settings and, for the vllm engine, generate.vllm's are the options)."""
    global _loaded
    name = gen.backend
    if name not in BACKENDS:
        raise ValueError(f"unknown generation backend {name!r}; available: {', '.join(BACKENDS)}")
    options = getattr(gen, name).model_dump(mode="json") if name in ("vllm", "openai") else None
    if name == "ray" and ray is not None:
        options = {"ray": ray.model_dump(mode="json"), "vllm": gen.vllm.model_dump(mode="json")}
    key = (name, content_hash(options), str(model_path), device)
    if _loaded is None or _loaded[0] != key:
        release_backends()
        _loaded = (key, BACKENDS[name](gen, model_path, device, ray))
    return _loaded[1]


def release_backends() -> None:
    global _loaded
    if _loaded is not None:
        _loaded[1].close()
    _loaded = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
