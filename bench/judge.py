"""Judge throughput: the probability mode (one forward pass per candidate) against the paper's sampled mode.

    python bench/judge.py --model real --threads 2    # SmolLM2-135M-Instruct, the demo's judge settings
    python bench/judge.py --smoke                     # a random tiny model, 4 candidates

Both modes judge the same candidates (seed instructions with their answers) with the same template through the
transformers backend and the judge stage's own function, `flywheel.stages.judge.verdicts`: `choice_probs` after
"Score:" for the probability mode, `generate` with k samples of up to --tokens new tokens for the sampled mode (the paper: 3 samples; a judgment with a short
justification needs ~60 tokens). Throughput is candidates judged per second, best of --repeats after a warm-up call.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import model_for, print_table, ratio, seed_pairs


def best_seconds(fn, repeats: int) -> float:
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        took = time.perf_counter() - t0
        best = took if best is None else min(best, took)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--model", default=None, help="'real' (SmolLM2-135M-Instruct) or a model folder; default: a random "
                                                  "tiny model")
    p.add_argument("--candidates", type=int, default=None)
    p.add_argument("--samples", type=int, default=3, help="sampled mode: judge samples per candidate (paper: 3)")
    p.add_argument("--tokens", type=int, default=None, help="sampled mode: max new tokens per judgment")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--template", default="prompts/judge_compact.txt")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    count = args.candidates or (4 if args.smoke else 16)
    tokens = args.tokens or (8 if args.smoke else 64)
    repeats = args.repeats or (1 if args.smoke else 2)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from flywheel.backends import TransformersBackend
    from flywheel.config import JudgeConfig
    from flywheel.stages.judge import verdicts

    with tempfile.TemporaryDirectory() as tmp:
        backend = TransformersBackend(str(model_for(args, tmp)), "cpu")
    template = Path(args.template).read_text()
    items = list(zip(*seed_pairs(count)))
    settings = {mode: JudgeConfig(mode=mode, samples=args.samples, temperature=0.7, top_p=0.9, max_new_tokens=tokens,
                                  batch_size=args.batch_size) for mode in ("prob", "sample")}
    found: dict[str, list] = {}

    def judged(mode: str) -> None:  # as the judge stage does: `verdicts` on each batch, a seed per batch
        scores = []
        for i in range(0, len(items), args.batch_size):
            for v in verdicts(backend, template, items[i : i + args.batch_size], settings[mode], seed=i):
                scores += v.scores
        found[mode] = scores

    def prob() -> None:
        judged("prob")

    def sampled() -> None:
        judged("sample")

    prob()
    sampled()  # warm-up, and the scores for the notes
    t_prob, t_sample = best_seconds(prob, repeats), best_seconds(sampled, repeats)
    parsed = {k: sum(v is not None for v in vals) / len(vals) for k, vals in found.items()}
    rows = [["prob: 1 forward pass per candidate", f"{count / t_prob:.2f}", ratio(t_sample, t_prob),
             f"{parsed['prob']:.0%}"],
            [f"sample: {args.samples} x up to {tokens} tokens (baseline)", f"{count / t_sample:.2f}", "1.00x",
             f"{parsed['sample']:.0%}"]]
    params_n = sum(x.numel() for x in backend.model.parameters())
    print_table("Judge throughput: probability mode vs sampled mode (transformers backend)",
                ["mode", "candidates/s", "vs baseline", "scored"], rows,
                [f"model: {args.model or 'random tiny Llama'}, {params_n:,} parameters, CPU, "
                 f"{torch.get_num_threads()} torch threads; {count} candidates, template {args.template}, batch "
                 f"{args.batch_size}, best of {repeats}",
                 "scored: share of candidates (prob) or samples (sample) with a score; the sampled mode's share "
                 "depends on the model having learnt to write 'Score: N'"])


if __name__ == "__main__":
    main()
