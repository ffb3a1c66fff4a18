"""`flywheel report [RUN_ID] [--registry DIR] [--strict]`: the per-iteration report and the failure-mode monitors.

Prints the report, writes `<registry>/runs/<run_id>/report.md` (with report.json and PNG plots beside it) and lists
every monitor that fired. RUN_ID defaults to the newest run in the registry. With --strict the exit code is 1 when
any monitor fired, so a schedule or CI job can stop on it.
"""

from __future__ import annotations

from . import add_registry_arg, console


def _report(args) -> int:
    from ..analysis import report
    from ..analysis.monitors import fired
    from ..registry import reader

    with reader(args.registry) as reg:  # read-only, no lock: never stops a running flywheel
        run_id = report.resolve_run(reg, args.run_id)
        iterations, checks, path = report.write(reg, run_id)
        bootstrap = report.bootstrap_sentence(reg, run_id)
        status = report.status_sentence(reg, run_id)
    report.print_report(run_id, iterations, checks, console, bootstrap, status)
    console.print(f"Report: {path}", soft_wrap=True)
    warnings = fired(checks)
    if args.strict and warnings:
        console.print(f"[red]--strict: {len(warnings)} monitor warning(s)[/]")
        return 1
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="a run's per-iteration report with plots and reward-hacking monitors")
    p.add_argument("run_id", nargs="?", default=None, metavar="RUN_ID", help="default: the newest run")
    add_registry_arg(p)
    p.add_argument("--strict", action="store_true", help="exit 1 when any monitor fires")
    p.set_defaults(func=_report)
