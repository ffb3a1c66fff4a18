"""Coherent-reward scoring speed: `flywheel.signals.coherent_rewards` against a bare batched forward pass.

    python bench/reward.py            # the demo config's model size, 512 (prompt, response) pairs from the seeds
    python bench/reward.py --smoke    # tests/tiny.py's size, 32 pairs

Two random tiny Llamas sharing one tokenizer stand in for the SFT and PT models. The reward path scores every pair
with both models (tokenising, batching, log-softmax and gather of the response tokens included). The baseline runs
the same two models over exactly the same token ids in the same batches (sorted by length, padded on the right, as
the reward path does) and only computes logits. tokens/s counts every token forwarded (prompt + response + eos, per
model; the reward path's LM head skips positions that only condition, its transformer layers do not). Each figure
is the best of --repeats rounds (default 5) after a warm-up, the two paths taking turns in each round.
Goal: reward path >= 0.9x the bare forward pass.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import print_table, ratio, seed_pairs, tiny_model


def best_seconds(fns: list, repeats: int) -> list[float]:
    """Best time of each function over `repeats` rounds, the functions taking turns within a round: on a shared
    machine, load that comes and goes then falls on both paths alike rather than on whichever ran second."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--pairs", type=int, default=None, help="(prompt, response) pairs (default 512; smoke 32)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = p.parse_args()
    count = args.pairs or (32 if args.smoke else 512)
    repeats = args.repeats or (1 if args.smoke else 5)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from flywheel.backends.models import load
    from flywheel.signals import coherent_rewards, encode, pad

    with tempfile.TemporaryDirectory() as tmp:
        sft_path = tiny_model(Path(tmp) / "sft", smoke=args.smoke, seed=0)
        _, tokenizer = load(sft_path)
        pt_path = tiny_model(Path(tmp) / "pt", smoke=args.smoke, seed=1, tokenizer=tokenizer)
        (sft, tokenizer), (pt, _) = load(sft_path), load(pt_path)
    prompts, responses = seed_pairs(count)
    bs = args.batch_size

    # the baseline's batches: the same ids, the same order and padding as the reward path
    seqs = [p_ids + r_ids for p_ids, r_ids in (encode(tokenizer, x, y) for x, y in zip(prompts, responses))]
    seqs.sort(key=lambda s: -len(s))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = [pad(seqs[i : i + bs], pad_id) for i in range(0, len(seqs), bs)]
    tokens = 2 * sum(len(s) for s in seqs)

    def reward_path():
        return coherent_rewards(sft, pt, tokenizer, prompts, responses, batch_size=bs, normalize=False, device="cpu")

    @torch.inference_mode()
    def bare_forward():
        for model in (sft, pt):
            for ids, mask in batches:
                model(input_ids=ids, attention_mask=mask).logits

    coherent_rewards(sft, pt, tokenizer, prompts[:bs], responses[:bs], batch_size=bs, normalize=False, device="cpu")
    bare, scored = best_seconds([bare_forward, reward_path], repeats)
    values = [r["value"] for r in reward_path()]
    if any(v is None for v in values):
        raise SystemExit("some pairs did not fit the model's context: the two paths would not cover the same tokens")
    params = sum(x.numel() for x in sft.parameters())
    rows = [["coherent_rewards (SFT + PT, log-probs of the response)", tokens, f"{scored:.3f}",
             f"{tokens / scored:.0f}", ratio(bare, scored)],
            ["bare batched forward (SFT + PT, logits only)", tokens, f"{bare:.3f}", f"{tokens / bare:.0f}", "1.00x"]]
    print_table(f"Coherent reward: {count} (prompt, response) pairs, batch {bs}",
                ["path", "tokens", "seconds", "tokens/s", "vs bare forward"], rows,
                [f"models: two random tiny Llamas, {params:,} parameters each, CPU, {torch.get_num_threads()} torch "
                 f"threads; best of {repeats} alternating rounds; mean reward {sum(values) / len(values):+.2f} (a sanity figure)",
                 "goal: reward path >= 0.9x the bare forward pass"])


if __name__ == "__main__":
    main()
