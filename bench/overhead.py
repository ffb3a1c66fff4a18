"""Orchestration overhead: each iteration's wall time against the time its stages spent computing.

    python bench/overhead.py                      # configs/tiny.yaml in a fresh registry (minutes on 2 cores)
    python bench/overhead.py --smoke              # tests/small.yaml, one short iteration

Runs the real Prefect flow once in this process. `compute_s` is what each stage spent inside model calls (generate,
forward, train: flywheel/timing.py). An iteration's wall time runs from the end of the one before (for iteration 0,
from the flow's call) to its own end, so the iterations and the run's end add up to the flow call. The rest of the
wall time is split into work inside stages that is not a model call (loading and saving models, tokenising, DuckDB,
Parquet) and time between stages (Prefect's task and flow runs, opening the registry). Prefect's start-up (its
temporary API, or a connection to PREFECT_API_URL) is measured apart, by an empty flow run first.
Goal: overhead (1 - compute / wall) <= 3%.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from _common import flow_args, flow_config, import_flow, prefect_startup, print_table, registry_note


def windows(reg, run_id: str, flow_start: datetime, flow_end: datetime) -> list[dict]:
    """Per iteration: wall window, summed stage wall (ledger start to end) and compute; then the run's end."""
    stages = reg.rows(
        "SELECT rs.iteration, s.stats, epoch(s.finished_at) - epoch(s.started_at) AS wall, s.finished_at "
        "FROM run_stages rs JOIN stage_runs s USING (stage_run_id) WHERE rs.run_id = ? ORDER BY rs.iteration", [run_id])
    ends = {r["iteration"]: r["finished_at"] for r in reg.rows(
        "SELECT iteration, finished_at FROM iterations WHERE run_id = ?", [run_id])}
    out, start = [], flow_start
    for t in sorted({s["iteration"] for s in stages}):
        mine = [s for s in stages if s["iteration"] == t]
        end = ends.get(t) or max(s["finished_at"] for s in mine)
        out.append({"part": "iteration 0 (seeds, PT, M1)" if t == 0 else f"iteration {t}",
                    "wall": (end - start).total_seconds(), "stages": sum(s["wall"] for s in mine),
                    "compute": sum(json.loads(s["stats"] or "{}").get("compute_s", 0.0) for s in mine)})
        start = end
    out.append({"part": "run end (after the last iteration)", "wall": (flow_end - start).total_seconds(),
                "stages": 0.0, "compute": 0.0})
    return out


def per_stage(reg, run_id: str) -> list[list]:
    """Each stage's ledger wall time against its compute: where the time that is not a model call goes."""
    rows = reg.rows(
        "SELECT rs.iteration, rs.stage, s.stats, epoch(s.finished_at) - epoch(s.started_at) AS wall "
        "FROM run_stages rs JOIN stage_runs s USING (stage_run_id) WHERE rs.run_id = ? "
        "ORDER BY rs.iteration, s.started_at", [run_id])
    out = []
    for r in rows:
        compute = json.loads(r["stats"] or "{}").get("compute_s", 0.0)
        out.append([r["iteration"], r["stage"], f"{r['wall']:.2f}", f"{compute:.2f}", f"{r['wall'] - compute:.2f}",
                    f"{compute / r['wall']:.3f}" if r["wall"] else "-"])
    return out


def main() -> None:
    args = flow_args(__doc__.splitlines()[0]).parse_args()
    cfg = flow_config(args)
    flywheel_flow = import_flow()
    startup = prefect_startup()

    from flywheel.registry import Registry

    flow_start = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    run_id = flywheel_flow(cfg)
    total = time.perf_counter() - t0
    flow_end = datetime.now(timezone.utc)
    with Registry(cfg.registry.root) as reg:
        parts = windows(reg, run_id, flow_start, flow_end)
        stages = per_stage(reg, run_id)
    whole = {"part": "whole run", "wall": total, "stages": sum(p["stages"] for p in parts),
             "compute": sum(p["compute"] for p in parts)}

    rows = []
    for p in [*parts, whole]:
        w = p["wall"]
        rows.append([p["part"], f"{w:.2f}", f"{p['compute']:.2f}", f"{p['compute'] / w:.3f}" if w else "-",
                     f"{100 * (1 - p['compute'] / w):.1f}%" if w else "-",
                     f"{100 * (p['stages'] - p['compute']) / w:.1f}%" if w else "-",
                     f"{100 * (w - p['stages']) / w:.1f}%" if w else "-"])
    rows.append(["Prefect start-up (apart)", f"{startup:.2f}", "-", "-", "-", "-", "-"])
    print_table(
        f"Orchestration overhead: run {run_id} ({cfg.run.iterations} iteration(s))",
        ["part", "wall s", "compute s", "compute / wall", "overhead", "in stages, not compute", "between stages"],
        rows,
        [registry_note(args, cfg),
         "overhead = 1 - compute / wall; it splits into work inside stages that is not a model call (model load and "
         "save, tokenisation, DuckDB, Parquet) and time between stages (Prefect task/flow runs, registry opens)",
         "goal: overhead <= 3%"], footer=False)
    print_table("Per stage: ledger wall time (start to end, dataset freeze included) against compute",
                ["iteration", "stage", "wall s", "compute s", "not compute s", "compute / wall"], stages)


if __name__ == "__main__":
    main()
