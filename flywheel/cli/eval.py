"""`flywheel eval judge`: how well a model, as the judge, agrees with human rankings.

    flywheel eval judge --data oasst_valid.jsonl --model M1 [--format auto] [--config X key=value ...]
                        [--registry DIR] [--json]

MODEL is a model folder, or a model id or name (PT, M1, M2, ...; the newest of that name) in the registry
(`--registry`, default the config's `registry.root`). The judge settings (template, samples, sampling) are the
config's `judge` section, the backend is `generate.backend`. Metrics and their definitions: flywheel/analysis/eval_judge.py.
Use data the model was not trained on (M1's EFT is made from the seed file's rankings).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..stages.seeds import FORMATS
from . import add_config_args, config_from, console


def _fmt(value, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def print_report(result: dict) -> None:
    from rich.table import Table

    m = result["metrics"]
    table = Table(title=f"judge agreement with human rankings: {result['model']['spec']} on {result['data']}",
                  title_justify="left")
    table.add_column("metric", no_wrap=True)
    table.add_column("value", justify="right")
    table.add_column("over")
    decided = m["agree"] + m["disagree"]
    table.add_row("pairwise accuracy (judge ties excluded)", _fmt(m["pairwise_accuracy"], True),
                  f"{m['agree']} of {decided} pairs the judge ordered")
    table.add_row("judge ties (reported separately)", str(m["judge_ties"]),
                  f"{_fmt(m['judge_tie_rate'], True)} of {m['pairs']} pairs humans ranked differently")
    table.add_row("pairwise accuracy (ties as wrong)", _fmt(m["pairwise_accuracy_ties_as_wrong"], True),
                  f"{m['agree']} of {m['pairs']} pairs")
    table.add_row("Spearman (mean per prompt)", _fmt(m["spearman"]), f"{m['prompts_correlated']} prompts")
    table.add_row("Kendall tau-b (mean per prompt)", _fmt(m["kendall_tau"]), f"{m['prompts_correlated']} prompts")
    table.add_row("prompts", str(m["prompts"]), f"{m['prompts_compared']} with 2+ distinct human ranks among scored "
                  f"replies; {m['prompts_judge_constant']} where the judge scored all alike (no correlation)")
    table.add_row("replies", str(m["replies"]), f"{m['unscored']} with no valid judge score and {m['unranked']} "
                  "unranked: excluded")
    errors = ", ".join(f"{k} {v}" for k, v in sorted(result["parse_errors"].items())) or "none"
    table.add_row("judge samples", str(result["judge"]["samples_total"]), f"parse failures: {errors}")
    console.print(table)


def _judge(args) -> int:
    from collections import Counter

    from ..analysis.eval_judge import agreement, by_prompt, judge_ranked, resolve_model
    from ..stages.seeds import load_seed_data

    cfg = config_from(args)
    data = load_seed_data(args.data, args.format)
    if not any(p.ranked_replies() for p in data.ranked):
        raise ValueError(f"{args.data}: no human-ranked replies (read as {data.format}); judge agreement needs "
                         "ranked replies, such as Open Assistant message trees (--format oasst)")
    model = resolve_model(args.model, args.registry or cfg.registry.root)
    try:
        replies = judge_ranked(cfg, data.ranked, model["path"])
    except OSError as e:  # from_pretrained on a folder that holds no model
        raise ValueError(f"--model {args.model}: cannot load a model from {model['path']}: {e}") from None
    report = agreement(by_prompt(replies))
    errors = Counter(e for r in replies for e in r.errors)
    result = {
        "data": str(args.data), "format": data.format,
        "model": {"spec": args.model, **model},
        "judge": {"template": str(cfg.judge.template), "samples": cfg.judge.samples,
                  "temperature": cfg.judge.temperature, "top_p": cfg.judge.top_p,
                  "max_new_tokens": cfg.judge.max_new_tokens, "backend": cfg.generate.backend,
                  "samples_total": sum(len(r.sample_scores) for r in replies)},
        "metrics": report.as_dict(),
        "ties": "judge ties are reported separately: pairwise_accuracy excludes them; "
                "pairwise_accuracy_ties_as_wrong counts them as wrong",
        "parse_errors": dict(errors),
        "replies": [r.__dict__ for r in replies],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate models (judge agreement with human rankings)")
    evals = p.add_subparsers(dest="eval_command", required=True)
    j = evals.add_parser("judge", help="agreement of a model's judge scores with human rankings",
                         description="Score every human-ranked reply in --data with MODEL as the judge, then report "
                                     "pairwise accuracy (judge ties reported separately), Spearman and Kendall tau.")
    j.add_argument("--data", type=Path, required=True, help="human-ranked replies, e.g. Open Assistant trees JSONL")
    j.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="format of --data (default: auto)")
    j.add_argument("--model", required=True, help="a model folder, or a model id or name (PT, M1, ...) in the registry")
    j.add_argument("--registry", type=Path, default=None, help="registry root (default: the config's registry.root)")
    j.add_argument("--json", action="store_true", help="print the report and every reply's scores as JSON")
    add_config_args(j)
    j.set_defaults(func=_judge)
