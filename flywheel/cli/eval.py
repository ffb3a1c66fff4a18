"""`flywheel eval judge`: how well a model, as the judge, agrees with human rankings.
`flywheel eval ifeval`: how well a model follows IFEval's verifiable instructions (flywheel/analysis/ifeval.py).

    flywheel eval judge --data oasst_valid.jsonl --model M1 [--format auto] [--config X key=value ...]
                        [--registry DIR] [--json]

The report counts what was scored: pairs of replies both judged, of the pairs humans ranked differently, and says
what was skipped and why (trees with no ranked reply, prompts with one human rank or too few scored replies).
MODEL is a model folder, or a model id or name (PT, M1, M2, ...; the newest of that name) in the registry
(`--registry`, default the config's `registry.root`). The judge settings (template, samples, sampling) are the
config's `judge` section, the backend is `generate.backend`. Metrics and their definitions: flywheel/analysis/eval_judge.py.
Use data the model was not trained on (M1's EFT is made from the seed file's rankings).

    flywheel eval ifeval --data test.jsonl --model M1 [--registry DIR] [--max-new-tokens N] [--batch-size B]
                         [--out FILE] [--json] [--config X key=value ...]

One greedy response per prompt of an IFEval-format file (the model's chat template, `generate.backend`), checked
strictly and loosely; prints prompt- and instruction-level accuracy and per-instruction-id accuracy, writes every
prompt's result to a JSON file (`--out`, default `<registry>/evals/<eval id>.json`) and stores the result in the
registry (`evals`, `eval_items`). The same model (by weights), data (by sha256) and settings again print the stored
result without loading the model.
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
                  f"{_fmt(m['judge_tie_rate'], True)} of {m['pairs']} scored pairs")
    table.add_row("pairwise accuracy (ties as wrong)", _fmt(m["pairwise_accuracy_ties_as_wrong"], True),
                  f"{m['agree']} of {m['pairs']} scored pairs")
    table.add_row("pairs humans ranked differently", str(m["ranked_pairs"]),
                  f"{m['pairs']} scored; {m['pairs_unscored']} skipped: a reply with no valid judge score")
    table.add_row("Spearman (mean per prompt)", _fmt(m["spearman"]), f"{m['prompts_correlated']} prompts")
    table.add_row("Kendall tau-b (mean per prompt)", _fmt(m["kendall_tau"]), f"{m['prompts_correlated']} prompts")
    table.add_row("prompts", str(m["prompts"]), f"{m['prompts_compared']} compared (2+ distinct human ranks among "
                  f"scored replies), {m['prompts_judge_constant']} of them scored all alike (no correlation); "
                  f"skipped: {m['prompts_one_rank']} with fewer than 2 distinct human ranks, {m['prompts_unscored']} "
                  "with too few scored replies")
    if result["records_without_ranks"]:
        table.add_row("records skipped", str(result["records_without_ranks"]),
                      "trees in the file with no human-ranked reply: not judged")
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
        "data": str(args.data), "format": data.format, "records_without_ranks": data.unranked,
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


def print_ifeval(result: dict) -> None:
    from rich.table import Table

    m = result["metrics"]
    name = result["model"]["name"] or result["model"]["spec"]
    table = Table(title=f"IFEval: {name} on {result['data']['path']} ({m['prompts']} prompts, "
                        f"{m['instructions']} instructions)", title_justify="left")
    table.add_column("metric", no_wrap=True)
    table.add_column("strict", justify="right")
    table.add_column("loose", justify="right")
    table.add_row("prompt-level accuracy", f"{_fmt(m['prompt_strict'], True)} ({m['prompt_strict_followed']}/"
                  f"{m['prompts']})", f"{_fmt(m['prompt_loose'], True)} ({m['prompt_loose_followed']}/{m['prompts']})")
    table.add_row("instruction-level accuracy", f"{_fmt(m['instruction_strict'], True)} "
                  f"({m['instruction_strict_followed']}/{m['instructions']})",
                  f"{_fmt(m['instruction_loose'], True)} ({m['instruction_loose_followed']}/{m['instructions']})")
    console.print(table)
    per = Table(title="per instruction id", title_justify="left")
    per.add_column("instruction id", no_wrap=True)
    per.add_column("n", justify="right")
    per.add_column("strict", justify="right")
    per.add_column("loose", justify="right")
    for iid, v in m["per_instruction"].items():
        per.add_row(iid, str(v["n"]), _fmt(v["strict"], True), _fmt(v["loose"], True))
    console.print(per)
    items = result["items"]
    cut = sum(i["finish_reason"] == "length" for i in items)
    tokens = sum(i["num_tokens"] for i in items) / len(items) if items else 0
    how = "stored result, nothing generated" if result.get("stored") else f"generated in {result['seconds']:.1f} s"
    console.print(f"eval {result['eval_id']}: {how}; mean response {tokens:.0f} tokens, {cut} cut at max_new_tokens "
                  f"({result['settings']['max_new_tokens']}); checker errors: {m['checker_errors']}", highlight=False)


def _ifeval(args) -> int:
    from ..analysis.ifeval import evaluate, result_json

    cfg = config_from(args)
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise ValueError("--max-new-tokens and --batch-size must be at least 1")
    root = Path(args.registry or cfg.registry.root)
    result = evaluate(cfg, args.data, args.model, root, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size)
    out = Path(args.out) if args.out else root / "evals" / f"{result['eval_id']}.json"
    if args.out or not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result_json(result), indent=1) + "\n")
    if args.json:
        print(json.dumps(result_json(result), indent=1))
    else:
        print_ifeval(result)
        console.print(f"per-prompt results: {out}", highlight=False)
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate models (judge agreement with human rankings, IFEval)")
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
    f = evals.add_parser("ifeval", help="instruction following on IFEval-format prompts (strict and loose)",
                         description="Generate one greedy response per prompt of --data with MODEL's chat template, "
                                     "check each instruction with IFEval's checkers (strict and loose), print "
                                     "prompt- and instruction-level accuracy, and store the result in the registry; "
                                     "the same model, data and settings again print the stored result.")
    f.add_argument("--data", type=Path, required=True,
                   help="IFEval JSON Lines: {key, prompt, instruction_id_list, kwargs} per line")
    f.add_argument("--model", required=True, help="a model folder, or a model id or name (PT, M1, ...) in the registry")
    f.add_argument("--registry", type=Path, default=None,
                   help="registry root, where the result is stored (default: the config's registry.root)")
    f.add_argument("--max-new-tokens", type=int, default=512, help="response length limit (default: 512)")
    f.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    f.add_argument("--out", type=Path, default=None,
                   help="JSON file for every prompt's result (default: <registry>/evals/<eval id>.json)")
    f.add_argument("--json", action="store_true", help="print the whole result as JSON")
    add_config_args(f)
    f.set_defaults(func=_ifeval)
