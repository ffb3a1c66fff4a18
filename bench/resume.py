"""Resume of a finished run: the wall time of running it again, and how many models that loads.

    python bench/resume.py                        # configs/tiny.yaml: run it once (the baseline), then again
    python bench/resume.py --registry DIR         # a registry where the run has finished (bench/overhead.py's)
    python bench/resume.py --smoke

Runs the real Prefect flow in this process. The first run (skipped when the registry already holds the finished
run) is the baseline; the second must skip every stage from the ledger. Model loads are counted by wrapping
`flywheel.backends.models.load` wherever a stage module bound it, and `AutoModelForCausalLM.from_pretrained`. Prefect's
start-up is measured apart, by an empty flow run first. Goal: the re-run <= 2 s, zero model loads.
"""

from __future__ import annotations

import time

from _common import Probe, flow_args, flow_config, import_flow, prefect_startup, print_table, ratio, registry_note


def main() -> None:
    args = flow_args(__doc__.splitlines()[0]).parse_args()
    cfg = flow_config(args)
    flywheel_flow = import_flow()
    startup = prefect_startup()

    from flywheel.registry import Registry
    from flywheel.registry.runs import run_id_for

    run_id = run_id_for(cfg)
    with Registry(cfg.registry.root) as reg:
        done = reg.scalar("SELECT status FROM runs WHERE run_id = ?", [run_id]) == "done"
    first = None
    if not done:
        t0 = time.perf_counter()
        flywheel_flow(cfg)
        first = time.perf_counter() - t0

    probe = Probe().install()
    t0 = time.perf_counter()
    flywheel_flow(cfg)
    again = time.perf_counter() - t0
    ran = [f"{s.stage} ({s.iteration})" for s in probe.stages if not s.skipped]
    inside = sum(s.wall_s for s in probe.stages)

    rows = [["first run (baseline)", f"{first:.2f} s" if first else "finished before (not timed)", "-"],
            ["re-run of the finished run", f"{again:.2f} s", "<= 2 s"],
            ["re-run / first run", ratio(again, first) if first else "-", "-"],
            ["of the re-run: inside the stage calls (ledger look-ups)", f"{inside:.2f} s", "-"],
            ["of the re-run: the rest (Prefect flow and task runs, run rows)", f"{again - inside:.2f} s", "-"],
            ["stages skipped / called", f"{len(probe.stages) - len(ran)} / {len(probe.stages)}", "all"],
            ["iterations skipped whole (no stage called)",
             f"{cfg.run.iterations - len({s.iteration for s in probe.stages if s.iteration >= 1})} / {cfg.run.iterations}",
             "-"],
            ["flywheel.backends.models.load calls", probe.loads["flywheel.backends.models.load"], "0"],
            ["AutoModelForCausalLM.from_pretrained calls", probe.loads["from_pretrained"], "0"],
            ["Prefect start-up (apart)", f"{startup:.2f} s", "-"]]
    print_table(f"Resume of a finished run: {run_id}", ["measure", "value", "goal"], rows,
                [registry_note(args, cfg)] + ([f"stages that ran again: {', '.join(ran)}"] if ran else []))


if __name__ == "__main__":
    main()
