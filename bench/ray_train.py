"""DPO step time as a Ray Train job of 2 CPU workers (train.launch.mode=ray) against in-process training, same job.

    OMP_NUM_THREADS=1 python bench/ray_train.py            # a random tiny Llama (configs/tiny.yaml's size): ~4 min
    OMP_NUM_THREADS=1 python bench/ray_train.py --smoke    # smaller model, fewer pairs

One job (the same pairs, the same tiny M_t, run.device=cpu, 1 torch thread per process) trained three ways:
- baseline: in this process (`train.launch.mode: inprocess`, `flywheel.training.common.run_job`);
- `flywheel.training.launch.run_ray` on a real local Ray cluster (`ray start --head --num-cpus 2`,
  tests/helpers/ray_cluster.py), 2 workers of 1 CPU each, with the same dpo.batch_size per process: the workers split
  the pairs, so a step takes 2 x batch pairs and there are half the steps;
- the same with dpo.batch_size halved per worker: the same global batch and number of steps as the baseline.
s/step is the trainer's own (train_runtime / steps, rank 0's); the wall column is the whole call (Ray: job folder,
connect, worker start-up, model loads, training, save), Ray's cluster start-up excluded.
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
    p.add_argument("--pairs", type=int, default=None, help="DPO pairs (default 32; smoke 8)")
    p.add_argument("--batch-size", type=int, default=4, help="dpo.batch_size per process (even)")
    p.add_argument("--max-length", type=int, default=128)
    args = p.parse_args()
    n = args.pairs or (8 if args.smoke else 32)

    import torch

    torch.set_num_threads(1)
    from flywheel.config import load_config
    from flywheel.training.common import run_job
    from flywheel.training.dpo import fit_dpo
    from flywheel.training.job import TrainJob
    from flywheel.training.launch import run_ray
    from tests.helpers.ray_cluster import ray_head

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = str(tiny_model(tmp / "m1", smoke=args.smoke))
        questions, answers = seed_pairs(3 * n)
        pairs = [{"prompt": questions[i], "chosen": answers[i + n], "rejected": answers[i + 2 * n]} for i in range(n)]

        def cfg(batch: int, *ray):
            return load_config(None, [f"registry.root={tmp}", "run.device=cpu", f"dpo.batch_size={batch}",
                                      f"dpo.max_length={args.max_length}", "dpo.dropout=0", *ray])

        results = {}
        job = TrainJob("dpo", model, str(tmp / "out-inprocess"), pairs)
        t0 = time.perf_counter()
        results["in-process, 1 process (baseline)"] = (run_job(cfg(args.batch_size), job, fit_dpo),
                                                       time.perf_counter() - t0, args.batch_size)
        with ray_head(num_cpus=2) as address:
            ray_args = ["train.launch.mode=ray", "train.launch.num_processes=2", "ray.cpus_per_worker=1",
                        f"ray.address={address}"]
            for name, batch in ((f"Ray Train, 2 workers, batch {args.batch_size} each", args.batch_size),
                                (f"Ray Train, 2 workers, batch {args.batch_size // 2} each (same global batch)",
                                 args.batch_size // 2)):
                job = TrainJob("dpo", model, str(tmp / f"out-ray-{batch}"), pairs)
                t0 = time.perf_counter()
                metrics = run_ray(cfg(batch, *ray_args), job, tmp / "jobs" / f"ray-{batch}")
                results[name] = (metrics, time.perf_counter() - t0, 2 * batch)
                if metrics.get("world_size") != 2:
                    sys.exit(f"{name}: trained on {metrics.get('world_size')} processes, not 2")

    base = results["in-process, 1 process (baseline)"][0]
    rows = []
    for name, (m, wall, global_batch) in results.items():
        rows.append([name, m["steps"], global_batch, f"{m['seconds_per_step']:.3f}",
                     ratio(m["seconds_per_step"], base["seconds_per_step"]),
                     f"{global_batch / m['seconds_per_step']:.1f}", f"{wall:.1f}"])
    print_table("DPO as a Ray Train job (2 CPU workers) vs in-process: s/step",
                ["configuration", "steps", "pairs/step", "s/step", "s/step vs baseline", "pairs/s", "wall s"], rows,
                [(f"model: random tiny Llama ({'smoke size' if args.smoke else 'configs/tiny.yaml size'}); {n} pairs, "
                  f"dpo.max_length {args.max_length}, run.device cpu, 1 torch thread per process; Ray: a local "
                  "`ray start --head --num-cpus 2`, gloo, ray.cpus_per_worker 1"),
                 ("s/step vs baseline > 1x: a Ray step is slower (it also averages gradients over gloo and, with the "
                  "same per-process batch, takes twice the pairs)")])


if __name__ == "__main__":
    main()
