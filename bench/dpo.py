"""DPO step time and peak memory: the CPU path of the real-model demo against the plain one, same pairs.

    python bench/dpo.py --model real --threads 2   # SmolLM2-135M-Instruct: ~5 min here
    python bench/dpo.py --smoke                    # a random tiny model

Each configuration trains in its own child process (peak RSS is per process: `ru_maxrss` of the child) on the same
pairs (seed questions; chosen = two seed answers, rejected = two others; ~80-100 tokens each) for --steps steps of
--batch-size pairs:
- baseline ("the current path" before issue 12): full-parameter DPO, TRL's resident copy of the model as the
  reference, the whole batch in one forward pass;
- lean: LoRA adapters (merged on save), reference log-probs precomputed once before training (no second model),
  micro-batches of --micro pairs accumulated to the same batch. TRL's DPO already computes per-token log-probs with a
  chunked LM head (no full 49k-vocabulary logits held).
Goal (issue 12): peak RSS <= 4 GB for the lean path on the real model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from _common import model_for, print_table, ratio, seed_pairs


def child(spec: dict) -> None:
    import resource

    import torch

    torch.set_num_threads(spec["threads"])
    from flywheel.backends.models import load
    from flywheel.config import LoraConfig
    from flywheel.training.loops import dpo_train

    model, tok = load(spec["model"])
    metrics = dpo_train(model, tok, spec["pairs"], beta=0.1, lr=5e-5, epochs=1, batch_size=spec["batch"],
                        max_length=512, device="cpu", seed=0, lora=LoraConfig(enabled=spec["lora"]),
                        precompute_ref=spec["precompute"], micro_batch_size=spec["micro"])
    print(json.dumps({"s_per_step": metrics.get("seconds_per_step"), "steps": metrics["steps"],
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--model", default=None, help="'real' (SmolLM2-135M-Instruct) or a model folder; default: a random "
                                                  "tiny model")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--micro", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child))
    steps = args.steps or (1 if args.smoke else 2)

    with tempfile.TemporaryDirectory() as tmp:
        model = str(model_for(args, tmp))
        questions, answers = seed_pairs(steps * args.batch_size * 4 + 4)
        n = steps * args.batch_size
        pairs = [{"prompt": questions[i], "chosen": f"{answers[i]} {answers[i + n]}",
                  "rejected": f"{answers[i + 2 * n]} {answers[i + 3 * n]}"} for i in range(n)]
        results = {}
        for name, lora, precompute, micro in (("baseline: full-parameter, resident reference, whole batch", False,
                                               False, None),
                                              (f"lean: LoRA, precomputed reference, micro-batch {args.micro}", True,
                                               True, args.micro)):
            spec = {"model": model, "pairs": pairs, "batch": args.batch_size, "lora": lora, "precompute": precompute,
                    "micro": micro, "threads": args.threads}
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                 text=True, check=False)
            if out.returncode:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    (base_name, base), (lean_name, lean) = results.items()
    rows = [[name, r["steps"], f"{r['s_per_step']:.2f}", ratio(base["s_per_step"], r["s_per_step"]),
             f"{r['maxrss_mb']:,.0f}", ratio(r["maxrss_mb"], base["maxrss_mb"])] for name, r in results.items()]
    print_table("DPO on CPU: s/step and peak RSS, lean path vs the plain one",
                ["configuration", "steps", "s/step", "speed vs baseline", "peak RSS MB", "RSS vs baseline"], rows,
                [f"model: {args.model or 'random tiny Llama'}; {n} pairs, batch {args.batch_size}, {args.threads} "
                 "torch threads, each configuration in its own process (the RSS includes the loaded model)",
                 f"goal: lean peak RSS <= 4,096 MB on the real model: {'met' if lean['maxrss_mb'] <= 4096 else 'not met'}"
                 f" ({lean['maxrss_mb']:,.0f} MB)"])


if __name__ == "__main__":
    main()
