"""Reward signals besides the judge: SRPPO's coherent reward and rule-based rewards. Pure functions, no registry.

    scores = coherent_rewards(sft, pt, tokenizer, prompts, responses, batch_size=16, normalize=False, device="cpu")
    value, details = make_rule(rule_cfg)(prompt, response, reference)
    funcs = reward_functions(cfg, sft, pt, tokenizer, device)     # for TRL's GRPO/RLOO, with reward_weights(cfg)

The coherent reward is r(x, y) = log p_SFT(y | x) - log p_PT(y | x): the sum over the response's tokens of the two
models' per-token log-ratio (divided by the token count when normalised). A response is scored exactly as it is
generated (`flywheel/backends/generation.py`) and trained on (TRL's SFT): the prompt as one user turn of the chat template with
the generation prompt, then the response's tokens, then the end-of-turn (eos) token. The prompt's tokens only
condition; the response and its eos are scored, so `tokens` counts the response's tokens plus one.

Rule rewards score a response against the prompt's `reference` answer, 1.0 or 0.0 (a python checker returns any float):
- exact: the response's final answer equals the reference after normalisation (whitespace runs collapsed, case folded,
  a trailing period dropped). The final answer is the text after the last "Answer:" (any case) on its line, or, when
  there is none or it is empty, the response's last non-empty line. The reference is normalised, not extracted.
- regex: the last match of `pattern` in the response, its group 1 if the pattern has a group, else the whole match,
  normalised and compared with the normalised reference; no match scores 0.0.
- python: `checker: "module:function"`, imported by name and called as function(prompt, response, reference) -> float.
A rule that cannot score one response (no reference; a checker that raises or returns a non-number) raises
`RewardError` naming the rule; one that cannot be built at all (bad pattern, unimportable checker) raises it from
`make_rule`, before any work.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import timing
from .config import FlywheelConfig, RuleRewardConfig

log = logging.getLogger("flywheel")

Prompt = str | list[dict]  # one user turn, or a list of chat messages


# Checkers named by a module path from before the layout of issue 13 keep resolving.
MOVED_MODULES = {"flywheel.miniworld": "flywheel.analysis.miniworld", "flywheel.rewards": "flywheel.signals"}


class RewardError(ValueError):
    """A reward that cannot be computed; the message names the rule or model."""


# --- the coherent reward ------------------------------------------------------------------------------------------
def chat_prompt(tokenizer, prompt: Prompt) -> str:
    """The text a chat model is given before it answers: one user turn (or the messages) plus the generation prompt."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(tokenizer, prompt: Prompt, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + eos), each tokenized on its own as generation produced them."""
    if tokenizer.eos_token_id is None:
        raise RewardError("the tokenizer has no eos token; the end of a response cannot be scored")
    prompt_ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids, response_ids


def pad(seqs: list[list[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of equal-length rows, padded on the right (or left) with `value`."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def encode_pairs(tokenizer, prompts: list[Prompt], responses: list[str]) -> list[tuple[list[int], list[int]]]:
    """`encode` for many pairs at once, with the same ids: each distinct prompt's chat text is rendered once (a
    prompt's n candidates share it) and the texts are tokenised in two batch calls instead of two calls per pair."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if tokenizer.eos_token_id is None:
        raise RewardError("the tokenizer has no eos token; the end of a response cannot be scored")
    if not prompts:
        return []
    rendered: dict[str, str] = {}
    chats = []
    for p in prompts:
        key = p if isinstance(p, str) else json.dumps(p, sort_keys=True)
        if key not in rendered:
            rendered[key] = chat_prompt(tokenizer, p)
        chats.append(rendered[key])
    prompt_ids = tokenizer(chats, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [(list(p), list(r) + [eos]) for p, r in zip(prompt_ids, response_ids)]


def sequence_logprobs(model, tokenizer, prompts: list[Prompt], responses: list[str], *, batch_size: int,
                      device: str) -> list[tuple[float, int]]:
    """For each (prompt, response): (sum of log p(response tokens + eos | chat-formatted prompt), that token count).
    Batches are padded on the right whatever the tokenizer's padding side, so every row keeps positions 0..n-1 and
    its scores do not depend on its batch. A pair longer than the model's context scores nan."""
    return encoded_logprobs(model, encode_pairs(tokenizer, prompts, responses), pad_id_of(tokenizer),
                            batch_size=batch_size, device=device)


def encoded_logprobs(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, *, batch_size: int,
                     device: str) -> list[tuple[float, int]]:
    """`sequence_logprobs` of pairs already encoded (`encode_pairs`), so two models can score one encoding.
    Per batch, no KV cache is built and the LM head runs from the earliest position that predicts a response token
    (`logits_to_keep`, when the model takes it); the response positions of every row are then taken at once (one
    log-sum-exp and one gather over those positions only, no per-row tensors), each row summed in float32."""
    limit = getattr(model.config, "max_position_embeddings", None)
    results: list[tuple[float, int]] = [(math.nan, len(r)) for _, r in pairs]
    fits = [i for i, (p, r) in enumerate(pairs) if limit is None or len(p) + len(r) <= limit]
    fits.sort(key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))  # similar lengths together: less padding
    keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    was_training = model.training
    model.eval()
    try:
        with timing.compute(), torch.inference_mode():
            for start in range(0, len(fits), batch_size):
                idx = fits[start : start + batch_size]
                ids, mask = pad([pairs[i][0] + pairs[i][1] for i in idx], pad_id)
                # logits at position t predict token t + 1: a row's response is predicted from len(prompt) - 1 on.
                # Positions before the batch's earliest such one only condition: the LM head skips them.
                lo = min(len(pairs[i][0]) for i in idx) - 1 if keep else 0
                extra = {"logits_to_keep": ids.shape[1] - lo} if keep else {}
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                               **extra).logits
                n_resp = [len(pairs[i][1]) for i in idx]
                counts = torch.tensor(n_resp)
                first = torch.repeat_interleave(torch.tensor([len(pairs[i][0]) - 1 - lo for i in idx]), counts)
                offset = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
                rows = torch.repeat_interleave(torch.arange(len(idx)), counts).to(logits.device)
                step = logits[rows, (first + offset).to(logits.device)].float()
                target = torch.tensor([t for i in idx for t in pairs[i][1]], device=step.device)
                logp = step.gather(-1, target[:, None]).squeeze(-1) - torch.logsumexp(step, dim=-1)
                for i, part in zip(idx, torch.split(logp, n_resp)):
                    results[i] = (float(part.sum()), len(pairs[i][1]))
    finally:
        model.train(was_training)
    return results


def check_same_tokenizer(a, b, name_a: str = "SFT", name_b: str = "PT") -> None:
    """The coherent reward compares two models' log-probabilities of the same token ids: one tokenizer for both."""
    for what, get in (("vocabulary", lambda t: t.get_vocab()), ("eos token", lambda t: t.eos_token_id),
                      ("chat template", lambda t: t.chat_template)):
        if get(a) != get(b):
            raise RewardError(f"the {name_a} and {name_b} models' tokenizers differ ({what}); the coherent reward "
                              "needs both models to share one tokenizer")


def coherent_rewards(sft_model, pt_model, tokenizer, prompts: list[Prompt], responses: list[str], *, batch_size: int,
                     normalize: bool, device: str) -> list[dict]:
    """Per response {"value", "logp_sft", "logp_pt", "tokens"}: value = logp_sft - logp_pt, divided by tokens when
    `normalize`. A response that does not fit a model's context gets value None and an "error"."""
    if sft_model.config.vocab_size != pt_model.config.vocab_size:
        raise RewardError(f"the SFT model's vocabulary ({sft_model.config.vocab_size}) differs from the PT model's "
                          f"({pt_model.config.vocab_size}); the coherent reward needs one tokenizer for both")
    pairs = encode_pairs(tokenizer, prompts, responses)  # once: both models score the same ids
    pad_id = pad_id_of(tokenizer)
    sft = encoded_logprobs(sft_model, pairs, pad_id, batch_size=batch_size, device=device)
    pt = encoded_logprobs(pt_model, pairs, pad_id, batch_size=batch_size, device=device)
    out = []
    for (logp_sft, n), (logp_pt, _) in zip(sft, pt):
        if math.isnan(logp_sft) or math.isnan(logp_pt):
            out.append({"value": None, "tokens": n,
                        "error": "prompt + response are longer than the model's context (max_position_embeddings)"})
            continue
        value = logp_sft - logp_pt
        out.append({"value": value / n if normalize else value, "logp_sft": logp_sft, "logp_pt": logp_pt, "tokens": n})
    return out


# --- rule rewards ---------------------------------------------------------------------------------------------------
_ANSWER = re.compile(r"answer\s*:[ \t]*(.*)", re.IGNORECASE)


def normalize_answer(text: str) -> str:
    return " ".join(text.split()).casefold().rstrip(".").strip()


def extract_answer(response: str) -> str:
    """The text after the last "Answer:" on its line, else the last non-empty line (see the module docstring)."""
    found = [m.group(1).strip() for m in _ANSWER.finditer(response)]
    if found and found[-1]:
        return found[-1]
    lines = [line.strip() for line in response.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@dataclass
class RuleReward:
    """A named rule: rule(prompt, response, reference) -> (value, details); raises RewardError when it cannot score."""

    name: str
    kind: str
    score: Callable[[str, str, str | None], tuple[float, dict]]

    def __call__(self, prompt: str, response: str, reference: str | None) -> tuple[float, dict]:
        return self.score(prompt, response, reference)


def make_rule(rule: RuleRewardConfig) -> RuleReward:
    name = rule.name

    def need(reference):
        if reference is None:
            raise RewardError(f"reward rule {name!r}: the prompt has no reference answer to compare with")
        return normalize_answer(reference)

    if rule.kind == "exact":
        def score(prompt, response, reference):
            answer = extract_answer(response)
            return float(normalize_answer(answer) == need(reference)), {"answer": answer}

    elif rule.kind == "regex":
        try:
            pattern = re.compile(rule.pattern)
        except re.error as e:
            raise RewardError(f"reward rule {name!r}: pattern {rule.pattern!r} is not a valid regex: {e}") from None

        def score(prompt, response, reference):
            matches = list(pattern.finditer(response))
            if not matches:
                need(reference)
                return 0.0, {"answer": None}
            answer = matches[-1].group(1) if pattern.groups else matches[-1].group(0)
            answer = answer or ""
            return float(normalize_answer(answer) == need(reference)), {"answer": answer}

    else:
        check = _import_checker(name, rule.checker)

        def score(prompt, response, reference):
            try:
                value = check(prompt, response, reference)
            except Exception as e:
                raise RewardError(f"reward rule {name!r}: checker {rule.checker} raised {type(e).__name__}: {e}") from e
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise RewardError(f"reward rule {name!r}: checker {rule.checker} returned {value!r}, not a number")
            return float(value), {}

    return RuleReward(name, rule.kind, score)


def _import_checker(name: str, spec: str) -> Callable:
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise RewardError(f"reward rule {name!r}: checker {spec!r} is not of the form 'module:function'")
    try:
        module = importlib.import_module(MOVED_MODULES.get(module_name, module_name))
    except Exception as e:
        raise RewardError(f"reward rule {name!r}: cannot import module {module_name!r} of checker {spec!r}: "
                          f"{type(e).__name__}: {e}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise RewardError(f"reward rule {name!r}: module {module_name!r} has no function {func_name!r}")
    return fn


# --- reward functions for TRL's GRPO / RLOO -------------------------------------------------------------------------
def online_signals(cfg: FlywheelConfig) -> list[tuple[str, float]]:
    """(name, weight) of each signal an online trainer (GRPO, RLOO) rewards with: the computable signals (coherent,
    rules) with a non-zero weight in reward.weights, in a fixed order. When none has one (the judge is not computed
    online), the coherent reward alone, as SRPPO uses it: so `train.trainer=grpo` works on its own."""
    names = (["coherent"] if cfg.reward.coherent else []) + [r.name for r in cfg.reward.rules]
    chosen = [(n, cfg.reward.weights.get(n, 0.0)) for n in names if cfg.reward.weights.get(n, 0.0)]
    return chosen or [("coherent", 1.0)]


_signals = online_signals


def reward_weights(cfg: FlywheelConfig) -> list[float]:
    """The weights of `reward_functions(cfg, ...)`, in order: pass them as GRPOConfig/RLOOConfig(reward_weights=...)."""
    return [w for _, w in _signals(cfg)]


def _prompt_of(prompt: Any) -> Prompt:
    return prompt if isinstance(prompt, str) else list(prompt)


def _user_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def _completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] for m in completion if m.get("role", "assistant") == "assistant")


def reward_functions(cfg: FlywheelConfig, sft_model, pt_model, tokenizer, device: str) -> list[Callable]:
    """TRL-shaped reward functions `(prompts, completions, **kwargs) -> list[float | None]`, one per signal with a
    non-zero weight in reward.weights (coherent, then the rules in config order), each named by its signal.

    They return raw, unweighted values: pass `reward_weights(cfg)` to TRL's `reward_weights`, so TRL logs each signal
    on its own scale and combines them. Prompts and completions may be plain strings (a string prompt is one user
    turn of the chat template, as our backends generate) or TRL's conversational message lists. Rules read the
    reference answer from `kwargs["reference"]` (the dataset's `reference` column). A value that cannot be computed
    is None, which TRL leaves out of that sample's sum; the reason is logged."""
    funcs: list[Callable] = []
    for name, _ in _signals(cfg):
        if name == "coherent":
            funcs.append(_coherent_fn(cfg, sft_model, pt_model, tokenizer, device))
        else:
            funcs.append(_rule_fn(make_rule(next(r for r in cfg.reward.rules if r.name == name))))
    return funcs


def _coherent_fn(cfg, sft_model, pt_model, tokenizer, device) -> Callable:
    def coherent(prompts, completions, **kwargs) -> list[float | None]:
        scores = coherent_rewards(sft_model, pt_model, tokenizer, [_prompt_of(p) for p in prompts],
                                  [_completion_text(c) for c in completions], batch_size=cfg.reward.batch_size,
                                  normalize=cfg.reward.normalize_by_length, device=device)
        for s in scores:
            if s["value"] is None:
                log.warning("coherent reward: %s", s["error"])
        return [s["value"] for s in scores]

    return coherent


def _rule_fn(rule: RuleReward) -> Callable:
    def fn(prompts, completions, **kwargs) -> list[float | None]:
        if "reference" not in kwargs:
            raise RewardError(f"reward rule {rule.name!r} needs a 'reference' column in the training dataset")
        values: list[float | None] = []
        for p, c, ref in zip(prompts, completions, kwargs["reference"]):
            try:
                values.append(rule(_user_text(_prompt_of(p)), _completion_text(c), ref)[0])
            except RewardError as e:
                log.warning("%s", e)
                values.append(None)
        return values

    fn.__name__ = rule.name
    return fn
