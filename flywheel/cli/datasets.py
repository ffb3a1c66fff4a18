"""`flywheel datasets`: list, show, diff and export the versioned datasets the stages froze.

    flywheel datasets list [--run RUN] [--name NAME]
    flywheel datasets show VERSION                         manifest, schema, a few rows; checks the file's hash
    flywheel datasets diff A B                             two pairs/train versions: added, removed, changed pairs
    flywheel datasets diff --run RUN --iterations 1 2      the training pairs of two iterations of a run
    flywheel datasets export VERSION --out DIR [--format hf|parquet]
    flywheel datasets restore VERSION                      rewrite a lost or damaged file from the registry rows

Every subcommand takes `--registry DIR` (default data_registry).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from . import add_registry_arg, console


def _say(text: str, markup: bool = True) -> None:
    console.print(text, markup=markup, highlight=False, soft_wrap=True)


@contextmanager
def open_registry(root):
    """The registry at `root`, read-only (`flywheel.registry.reader`: never stops a running flywheel)."""
    from ..registry import reader

    with reader(root) as reg:
        yield reg


def _list(args) -> int:
    from rich.table import Table

    from ..registry.datasets import list_versions

    with open_registry(args.registry) as reg:
        rows = list_versions(reg, run=args.run, name=args.name)
    if not rows:
        _say("no dataset versions" + (f" for run {args.run}" if args.run else ""))
        return 0
    table = Table(box=None, pad_edge=False)
    table.add_column("version", no_wrap=True)
    table.add_column("it", justify="right")
    table.add_column("stage")
    table.add_column("rows", justify="right")
    table.add_column("derived from", no_wrap=True)
    for r in rows:
        table.add_row(r["version_id"], str(r["iteration"]), r["stage"] or "?", str(r["num_rows"]),
                      "\n".join(r["derived_from"] or []) or "-")
    console.print(table)
    return 0


def _show(args) -> int:
    from rich.markup import escape

    from ..registry.datasets import read_version, version

    with open_registry(args.registry) as reg:
        row = version(reg, args.version)
        table = read_version(reg, args.version)  # raises DatasetIntegrityError if the file was altered
        path = reg.root / row["path"]
    _say(f"[bold]{row['version_id']}[/]  ({row['name']}, {row['num_rows']} rows)")
    for key in ("run_id", "iteration", "stage_run_id", "sha256", "code_hash", "config_hash", "created_at"):
        _say(f"  {key}: {row[key]}")
    _say(f"  file: {escape(str(path))}  [green](content hash verified)[/]")
    _say(f"  derived from: {', '.join(row['derived_from'] or []) or '-'}")
    _say("  schema: " + ", ".join(f"{c['name']} {c['type']}" for c in row["schema"]))
    for r in table.slice(0, args.rows).to_pylist():
        _say("  " + json.dumps(r, default=str, ensure_ascii=False)[:300], markup=False)
    return 0


def _diff(args) -> int:
    from ..registry.datasets import diff_pairs, run_iteration_version

    with open_registry(args.registry) as reg:
        if args.iterations:
            if not args.run or len(args.iterations) != 2:
                raise ValueError("--iterations takes two iteration numbers and needs --run RUN")
            a, b = (run_iteration_version(reg, args.run, t) for t in args.iterations)
        elif len(args.versions) == 2:
            a, b = args.versions
        else:
            raise ValueError("diff takes two versions (A B) or --run RUN --iterations I J")
        d = diff_pairs(reg, a, b)
    if args.format == "json":
        print(json.dumps(d, default=str, ensure_ascii=False, indent=2))
        return 0
    _say(f"[bold]{a}[/] -> [bold]{b}[/]: {len(d['added'])} added, {len(d['removed'])} removed, "
         f"{len(d['changed'])} changed, {d['unchanged']} unchanged")
    for sign, key in (("+", "added"), ("-", "removed")):
        for p in d[key][: args.limit]:
            _say(f" {sign} {p['prompt'][:80]!r}: chosen {p['chosen_score']:.3g}, rejected "
                 f"{p['rejected_score']:.3g}", markup=False)
    for c in d["changed"][: args.limit]:
        _say(f" ~ {c['prompt'][:80]!r}: {', '.join(c['fields'])} changed", markup=False)
    return 0


def _export(args) -> int:
    from ..registry.datasets import export_version

    with open_registry(args.registry) as reg:
        out = export_version(reg, args.version, args.out, format=args.format)
    _say(f"{args.version} -> {out}")
    return 0


def _restore(args) -> int:
    from ..registry.datasets import restore_version

    with open_registry(args.registry) as reg:
        path = restore_version(reg, args.version)
    _say(f"{args.version}: {path} (content hash verified)", markup=False)
    return 0


def register(sub) -> None:
    p = sub.add_parser("datasets", help="list, show, diff, export and restore versioned datasets")
    ds = p.add_subparsers(dest="datasets_command", required=True)

    q = ds.add_parser("list", help="dataset versions, oldest first")
    q.add_argument("--run", help="only versions this run used")
    q.add_argument("--name", help="only this dataset (seeds, prompts, candidates, judgments, rewards, pairs, train)")
    q.set_defaults(func=_list)

    q = ds.add_parser("show", help="a version's manifest and first rows; verifies its file")
    q.add_argument("version")
    q.add_argument("--rows", type=int, default=3, help="rows to print (default 3)")
    q.set_defaults(func=_show)

    q = ds.add_parser("diff", help="compare two pair sets: added, removed, changed (same pair = same prompt)")
    q.add_argument("versions", nargs="*", metavar="VERSION", help="two pairs or train versions")
    q.add_argument("--run", help="with --iterations: the run whose training pairs to compare")
    q.add_argument("--iterations", nargs=2, type=int, metavar=("I", "J"))
    q.add_argument("--format", choices=["text", "json"], default="text")
    q.add_argument("--limit", type=int, default=20, help="pairs to print per kind (text format)")
    q.set_defaults(func=_diff)

    q = ds.add_parser("export", help="write a version as a Hugging Face datasets folder or Parquet")
    q.add_argument("version")
    q.add_argument("--out", required=True, type=Path, help="output folder")
    q.add_argument("--format", choices=["hf", "parquet"], default="hf")
    q.set_defaults(func=_export)

    q = ds.add_parser("restore", help="rewrite a lost or damaged version file from the registry rows")
    q.add_argument("version")
    q.set_defaults(func=_restore)

    for q in ds.choices.values():
        add_registry_arg(q)
