"""`flywheel experiment NAME`: a verifiable world, every variant over every seed (flywheel/analysis/experiment.py).

    flywheel experiment sort [--config configs/experiments/sort.yaml] [--variants judge,rule-oracle]
                             [--registry DIR] [key=value ...]
    flywheel experiment ifworld --variants rule-oracle      # the real model on IFEval's instructions

NAME is `configs/experiments/NAME.yaml` unless --config names another file; overrides apply to that file
(`seeds=[0]`, `world.test=100`, `config.run.iterations=3`). Runs go to the registry (default data_registry) under
run names `NAME-VARIANT`; results to `<registry>/experiments/NAME/`. Running it again resumes: finished stages and
scored models are skipped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from . import console


def _experiment(args) -> int:
    from contextlib import ExitStack

    from ..analysis.experiment import load_experiment, run_experiment, summarise, table, write_results
    from ..progress import grid_table
    from ..registry.lock import RegistryBusyError, registry_lock

    path = Path(args.config or f"configs/experiments/{args.name}.yaml")
    exp = load_experiment(path, args.overrides)
    if exp.name != args.name:
        raise ValueError(f"{path} is experiment {exp.name!r}, not {args.name!r}")
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    with ExitStack() as held:
        try:
            held.enter_context(registry_lock(args.registry, f"experiment {exp.name}"))
        except RegistryBusyError as e:
            console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
            return 1
        console.print(f"[bold]flywheel experiment[/] {exp.name}: seeds {exp.seeds}, variants "
                      f"{variants or list(exp.variants)}, registry {args.registry}")
        t0 = time.perf_counter()
        rows = run_experiment(exp, args.registry, variants, console)
        path = write_results(exp, args.registry, rows)
    console.print(grid_table(f"experiment {exp.name}: mean ± sd over seeds {sorted({r['seed'] for r in rows})}",
                             *table(summarise(rows), exp.the_task.metric)))
    console.print(f"Results: {path} (curves.png, results.json beside it)", soft_wrap=True)
    console.print(f"Wall time: {time.perf_counter() - t0:.1f} s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("experiment", help="a verifiable world (sort, ifworld): held-out accuracy of M1, M2, ... per variant")
    p.add_argument("name", help="experiment name: configs/experiments/NAME.yaml")
    p.add_argument("--config", "-c", default=None, help="experiment YAML (default: configs/experiments/NAME.yaml)")
    p.add_argument("--variants", default=None, help="comma-separated subset of the experiment's variants")
    p.add_argument("--registry", type=Path, default=Path("data_registry"), help="registry root (default: data_registry)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="experiment config overrides, e.g. seeds=[0]")
    p.set_defaults(func=_experiment)
