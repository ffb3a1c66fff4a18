"""The generate stage on a local Ray cluster (generate.backend=ray, 2 actors x 1 CPU) against in-process, same work.

    OMP_NUM_THREADS=1 python bench/ray_generation.py            # configs/tiny.yaml's model size, 32 prompts: ~5 min
    OMP_NUM_THREADS=1 python bench/ray_generation.py --smoke    # a smaller model, fewer prompts

One generate stage (`flywheel.stages.generate.generate`: the same prompts, model, seeds and batches, a fresh registry
each time) run three ways, each timed as the whole stage call:
- in-process (generate.backend=transformers) with 1 torch thread, and with 2;
- generate.backend=ray on a real local cluster (`ray start --head --num-cpus 2`, tests/helpers/ray_cluster.py):
  ray.actors=2, ray.cpus_per_actor=1 (1 torch thread each). Its wall time includes joining the cluster, starting the
  actors and loading the model in each (every stage pays that); the cluster's own start-up is excluded.
Ray's candidates must equal those of in-process with 1 thread (the same thread count per engine), or the script
exits 1. Goal (issue 16): Ray <= 1.1x the in-process wall time on one machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # flywheel and tests.helpers of this tree
from _common import print_table, ratio, seed_pairs, tiny_model  # sets the environment, chdirs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--prompts", type=int, default=None, help="prompts (default 32; smoke 8)")
    p.add_argument("--n", type=int, default=4, help="candidates per prompt")
    p.add_argument("--tokens", type=int, default=None, help="generate.max_new_tokens (default 32; smoke 16)")
    p.add_argument("--batch-size", type=int, default=4, help="generate.batch_size (prompts per batch)")
    args = p.parse_args()
    prompts_n = args.prompts or (8 if args.smoke else 32)
    tokens = args.tokens or (16 if args.smoke else 32)

    import torch

    from flywheel.backends import release_backends
    from flywheel.config import load_config
    from flywheel.registry import Registry
    from flywheel.stages.generate import generate
    from tests.helpers.ray_cluster import ray_head
    from tests.helpers.registry import insert_rows, prompt_row

    questions, _ = seed_pairs(prompts_n)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny_model(tmp / "m", smoke=args.smoke)

        def run(name: str, threads: int, *overrides: str) -> tuple[float, list]:
            root = tmp / name
            with Registry(root) as reg:
                reg.register_model(model_id="m", run_id="r", name="m", kind="sft", iteration=0, parent_id=None,
                                   path=str(model), stage_run_id="sft", config_hash="h", metrics={})
                insert_rows(reg, "prompts", [prompt_row(f"p{i:03d}", q, "si") for i, q in enumerate(questions)])
            cfg = load_config(None, [f"registry.root={root}", "run.device=cpu", f"run.threads={threads}",
                                     f"generate.n={args.n}", f"generate.max_new_tokens={tokens}",
                                     f"generate.batch_size={args.batch_size}", *overrides])
            t0 = time.perf_counter()
            result = generate(cfg, "r", 1, "m", "si")
            wall = time.perf_counter() - t0
            release_backends()  # the next configuration loads its own (and a RayBackend leaves the cluster)
            with Registry(root) as reg:
                rows = reg.con.execute("SELECT candidate_id, text, seed FROM candidates WHERE stage_run_id = ? "
                                       "ORDER BY candidate_id", [result.stage_run_id]).fetchall()
            return wall, rows

        walls = {}
        walls["in-process, 1 thread"], one = run("inprocess-1", 1)
        walls["in-process, 2 threads"], _ = run("inprocess-2", 2)
        with ray_head(num_cpus=2) as address:
            walls["Ray: 2 actors x 1 CPU (1 thread)"], on_ray = run(
                "ray", 1, "generate.backend=ray", f"ray.address={address}", "ray.actors=2", "ray.cpus_per_actor=1")
        torch_threads = torch.get_num_threads()
    if on_ray != one:
        sys.exit(f"Ray's candidates differ from in-process with 1 thread ({len(on_ray)} vs {len(one)} rows)")

    best = min(walls["in-process, 1 thread"], walls["in-process, 2 threads"])
    rows = [[name, f"{wall:.1f}", ratio(wall, walls["in-process, 1 thread"]), ratio(wall, walls["in-process, 2 threads"]),
             ratio(wall, best)] for name, wall in walls.items()]
    batches = -(-prompts_n // args.batch_size)
    print_table("generate stage: Ray Data actor pool (2 x 1 CPU) vs in-process, wall time",
                ["configuration", "wall s", "vs in-process 1 thread", "vs in-process 2 threads", "vs best in-process"],
                rows,
                [(f"model: random tiny Llama ({'smoke size' if args.smoke else 'configs/tiny.yaml size'}); "
                  f"{prompts_n} prompts x {args.n} candidates x up to {tokens} tokens, {batches} batches of "
                  f"{args.batch_size} prompts; run.device cpu; torch threads after the runs: {torch_threads}"),
                 (f"Ray's {len(on_ray)} candidates equal in-process (1 thread)'s: texts, seeds, ids; Ray's wall "
                  "includes connecting, starting 2 actors and loading the model in each, not the cluster's start-up"),
                 "goal (issue 16): Ray <= 1.1x in-process on one machine"])


if __name__ == "__main__":
    main()
