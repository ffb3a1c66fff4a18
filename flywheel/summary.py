"""The per-iteration summary of a run, read back from the registry (so a resumed run reports everything it did)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from .progress import grid_table
from .registry import Registry

METRICS = ["model", "prompts made", "prompts kept", "dropped", "candidates", "judge samples", "parse failures",
           "mean judge score", "pairs", "unpaired (tie)", "DPO loss", "time (s)"]


def collect(reg: Registry, run_id: str) -> list[dict]:
    """One dict per iteration (0 = seeds, base model and SFT), with each stage's stats and the model made."""
    rows = reg.rows(
        "SELECT rs.iteration, rs.stage, s.status, s.stats, "
        "       epoch(s.finished_at) - epoch(s.started_at) AS seconds "
        "FROM run_stages rs JOIN stage_runs s USING (stage_run_id) WHERE rs.run_id = ? ORDER BY rs.iteration",
        [run_id])
    by_iter: dict[int, dict] = {}
    for r in rows:
        it = by_iter.setdefault(r["iteration"], {"iteration": r["iteration"], "stages": {}, "seconds": 0.0})
        it["stages"][r["stage"]] = {"status": r["status"], **json.loads(r["stats"] or "{}")}
        it["seconds"] += r["seconds"] or 0.0
    models = {m["model_id"]: m for m in reg.rows("SELECT model_id, name, path FROM models")}
    for it in by_iter.values():
        trainers = ("sft",) if it["iteration"] == 0 else ("dpo", "ppo", "grpo", "rloo", "rs-sft", "sft")
        made = next((it["stages"][k].get("model_id") for k in trainers if k in it["stages"]), None)
        it["model"] = models.get(made)
    return [by_iter[k] for k in sorted(by_iter)]


def bootstrap_line(it: dict) -> str:
    """Iteration 0 in one sentence: seeds, base model, M1."""
    s = it["stages"]
    sft, base = s.get("sft", {}), s.get("base", {})
    params = f" ({base['parameters']:,} parameters)" if "parameters" in base else ""
    loss = f", loss {sft['train_loss']:.3f}" if "train_loss" in sft else ""
    return (f"{s.get('seeds', {}).get('seeds', '?')} seeds; PT{params} -> M1 by SFT on {sft.get('ift', '?')} IFT + "
            f"{sft.get('eft', 0)} EFT examples{loss} ({it['seconds']:.0f} s)")


def metric_column(it: dict) -> list[str]:
    """The values of METRICS for one iteration >= 1."""
    si, gen, jd, pr, dpo = (it["stages"].get(k, {}) for k in ("self_instruct", "generate", "judge", "pairs", "dpo"))
    samples, fails = jd.get("samples"), jd.get("parse_failures")
    return [
        f"M{it['iteration']} -> {it['model']['name'] if it['model'] else '?'}",
        str(si.get("attempted", "-")),
        str(si.get("kept", "-")),
        ", ".join(f"{k} {v}" for k, v in si.get("dropped", {}).items()) or "0",
        str(gen.get("candidates", "-")),
        str(samples or "-"),
        f"{fails} ({100 * fails / samples:.1f}%)" if samples else "-",
        str(jd.get("mean_score", "-")),
        str(pr.get("pairs", "-")),
        str(pr.get("unpaired", "-")),
        f"{dpo['train_loss']:.3f}" if "train_loss" in dpo else "-",
        f"{it['seconds']:.0f}",
    ]


def _grid(iterations: list[dict]) -> tuple[list[str], list[list[str]]]:
    loop = [it for it in iterations if it["iteration"] > 0]
    columns = [metric_column(it) for it in loop]
    header = ["", *(f"iteration {it['iteration']}" for it in loop)]
    return header, [[m, *(c[i] for c in columns)] for i, m in enumerate(METRICS)]


def to_markdown(run_id: str, iterations: list[dict], registry_root: Path) -> str:
    header, grid = _grid(iterations)
    lines = [f"# Run {run_id}", ""]
    lines += [f"Iteration 0: {bootstrap_line(it)}." for it in iterations if it["iteration"] == 0]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in grid]
    lines += ["", f"Registry: `{registry_root / 'flywheel.duckdb'}`", "", "Models:"]
    lines += [f"- {it['model']['name']}: `{it['model']['path']}`" for it in iterations if it["model"]]
    snaps = [it["stages"]["pairs"]["snapshot"] for it in iterations if "snapshot" in it["stages"].get("pairs", {})]
    lines += ["", "Training-pair snapshots (Parquet):"] + [f"- `{p}`" for p in snaps]
    return "\n".join(lines) + "\n"


def write(reg: Registry, run_id: str) -> tuple[list[dict], Path]:
    """Collect the summary and write it as summary.md and summary.json under <registry>/runs/<run_id>/."""
    iterations = collect(reg, run_id)
    out = reg.root / "runs" / run_id
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(to_markdown(run_id, iterations, reg.root))
    (out / "summary.json").write_text(json.dumps(iterations, indent=2, default=str))
    return iterations, out / "summary.md"


def print_table(run_id: str, iterations: list[dict], console: Console | None = None) -> None:
    console = console or Console()
    table = grid_table(f"flywheel run {run_id}", *_grid(iterations))
    for it in iterations:
        if it["iteration"] == 0:
            console.print(f"Iteration 0: {bootstrap_line(it)}")
    console.print(table)
