"""`flywheel lineage ID`: the whole history of a pair, a model or a dataset version, from the registry.

    flywheel lineage pr-1a2b3c4d5e6f7a8b                  a pair: prompt, candidates, judge samples, rewards, rule,
                                                          dataset versions, the models trained on it
    flywheel lineage M2 --run demo-0123456789abcdef       a model (name + run, or its id): the models and datasets
                                                          back to the base
    flywheel lineage train-3f2a... --format json          a dataset version, as JSON
"""

from __future__ import annotations

import json

from . import add_registry_arg, console
from .datasets import open_registry


def _lineage(args) -> int:
    from ..registry.lineage import lineage, render

    with open_registry(args.registry) as reg:
        result = lineage(reg, args.id, run=args.run)
    if args.format == "json":
        print(json.dumps(result, default=str, ensure_ascii=False, indent=2))
    else:
        console.print(render(result), highlight=False)
    return 0


def register(sub) -> None:
    p = sub.add_parser("lineage", help="the history of a pair, model or dataset version")
    p.add_argument("id", help="a pair id, model id, model name (PT, M1, M2, ... with --run) or dataset version")
    p.add_argument("--run", help="the run a model name belongs to")
    p.add_argument("--format", choices=["text", "json"], default="text")
    add_registry_arg(p)
    p.set_defaults(func=_lineage)
