"""Peak memory of each stage: the process's peak RSS while the stage ran, on the demo config in a fresh registry.

    python bench/memory.py               # configs/tiny.yaml
    python bench/memory.py --smoke       # tests/small.yaml, one short iteration

Runs the real Prefect flow in this process, as `flywheel run` does. At each stage's start the kernel's peak-RSS mark
(VmHWM) is reset through /proc/self/clear_refs and read at its end, so each figure is that stage's own peak, exact to
the page (where /proc cannot be written, RSS is sampled every 5 ms instead; the table says which). The figures are of
the whole process: the imports, the Prefect client, and what earlier stages left loaded (the generation backend is
kept from self-instruct to judge on purpose), which is what a machine running the flywheel needs. "Growth" is peak
minus the RSS at the stage's start. The baseline is the process after its imports and Prefect's start-up.
"""

from __future__ import annotations

from _common import (
    PeakMeter,
    Probe,
    flow_args,
    flow_config,
    import_flow,
    prefect_startup,
    print_table,
    registry_note,
    rss_mb,
)


def main() -> None:
    args = flow_args(__doc__.splitlines()[0]).parse_args()
    cfg = flow_config(args)
    flywheel_flow = import_flow()
    startup = prefect_startup()

    baseline = rss_mb()
    meter = PeakMeter()
    probe = Probe(meter=meter).install()
    run_id = flywheel_flow(cfg)
    rows = [["-", "process after imports + Prefect start-up (baseline)", "-", f"{baseline:.0f}", "-", "1.00x", "-"]]
    for s in probe.stages:
        rows.append([s.iteration, s.stage + (" (skipped)" if s.skipped else ""), f"{s.rss_start_mb:.0f}",
                     f"{s.peak_mb:.0f}", f"{s.peak_mb - s.rss_start_mb:+.0f}", f"{s.peak_mb / baseline:.2f}x",
                     f"{s.wall_s:.1f}"])
    peak = max(s.peak_mb for s in probe.stages)
    print_table(f"Peak RSS per stage: run {run_id}",
                ["iteration", "stage", "RSS at start MB", "peak MB", "growth MB", "peak / baseline", "wall s"], rows,
                [f"method: {meter.method}; highest stage peak {peak:.0f} MB; Prefect start-up {startup:.1f} s",
                 registry_note(args, cfg)])


if __name__ == "__main__":
    main()
