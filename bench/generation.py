"""Batched generation against a per-prompt loop: the transformers backend's tokens/s, same model, same token count.

    python bench/generation.py             # the demo config's model size: 16 prompts x 4 samples x 64 tokens
    python bench/generation.py --smoke     # tests/tiny.py's size: 4 prompts x 2 samples x 8 tokens
    python bench/generation.py --model real --threads 2   # SmolLM2-135M-Instruct (the demo's model)

`TransformersBackend.generate` gets all prompts in one call (n samples each), as the generate stage does; the
baselines call it once per prompt with n samples, and once per sample (one sequence per call, the plain loop).
Every sequence is held to exactly the same length (min_new_tokens = max_new_tokens: the end-of-turn token cannot stop
it early), and tokens/s counts the tokens the backend returned. Each figure is the best of --repeats runs after a
warm-up call. Goal: batched >= 5x the one-sequence loop.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from _common import model_for, print_table, ratio, seed_pairs


def best_rate(fn, repeats: int) -> tuple[float, int]:
    """(tokens/s, tokens) of the fastest of `repeats` calls of fn() -> tokens."""
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = fn()
        rate = tokens / (time.perf_counter() - t0)
        best = max(best or (0.0, 0), (rate, tokens))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--n", type=int, default=None, help="samples per prompt")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per sample")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--model", default=None, help="'real' (SmolLM2-135M-Instruct) or a model folder; default: a random "
                                                  "tiny model")
    args = p.parse_args()
    prompts_n = args.prompts or (4 if args.smoke else 16)
    n = args.n or (2 if args.smoke else 4)
    tokens = args.tokens or (8 if args.smoke else 64)
    repeats = args.repeats or (1 if args.smoke else 3)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from flywheel.backends import SamplingParams, TransformersBackend

    with tempfile.TemporaryDirectory() as tmp:
        backend = TransformersBackend(str(model_for(args, tmp)), "cpu")
    prompts, _ = seed_pairs(prompts_n)
    backend.generate(prompts[:2], SamplingParams(n=2, max_new_tokens=tokens), seed=0, chat=True)  # warm-up
    backend.model.generation_config.min_new_tokens = tokens  # fixed lengths: no early end-of-turn

    def batched() -> int:
        outs = backend.generate(prompts, SamplingParams(n=n, max_new_tokens=tokens), seed=0, chat=True)
        return sum(g.num_tokens for gens in outs for g in gens)

    def per_prompt() -> int:
        return sum(g.num_tokens for i, x in enumerate(prompts)
                   for g in backend.generate([x], SamplingParams(n=n, max_new_tokens=tokens), seed=i, chat=True)[0])

    def per_sequence() -> int:
        return sum(backend.generate([x], SamplingParams(n=1, max_new_tokens=tokens), seed=i * n + k, chat=True)[0][0]
                   .num_tokens for i, x in enumerate(prompts) for k in range(n))

    results = [(f"batched: {prompts_n} prompts x {n} samples per call", *best_rate(batched, repeats)),
               (f"loop: 1 prompt x {n} samples per call", *best_rate(per_prompt, repeats)),
               ("loop: 1 sequence per call (baseline)", *best_rate(per_sequence, repeats))]
    base = results[-1][1]
    rows = [[name, tok, f"{rate:.0f}", ratio(rate, base)] for name, rate, tok in results]
    params = sum(x.numel() for x in backend.model.parameters())
    print_table(
        "Generation: batched vs a per-prompt loop (transformers backend)",
        ["mode", "tokens", "tokens/s", "vs baseline"], rows,
        [f"model: {args.model or 'random tiny Llama'}, {params:,} parameters, CPU, {torch.get_num_threads()} torch threads; "
         f"{tokens} new tokens per sequence (min_new_tokens = max_new_tokens), best of {repeats}",
         "goal: batched >= 5x the one-sequence loop"])


if __name__ == "__main__":
    main()
