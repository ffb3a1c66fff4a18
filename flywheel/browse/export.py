"""`flywheel browse --export-argilla WHICH --out DIR`: an iteration's pairs as Argilla 2.x dataset records.

WHICH is RUN_ID:ITERATION, an ITERATION of the newest run, or a pairs stage run id. DIR receives:

    records.jsonl    one record per line, Argilla 2.x's record layout (what `rg.Record.to_dict()` gives):
                     {"id": pair_id,
                      "fields": {"prompt": str, "chosen": str, "rejected": str},
                      "metadata": {"pair_id", "prompt_id", "chosen_id", "rejected_id", "run_id", "iteration",
                                   "margin", "chosen_score", "rejected_score", "chosen_tokens", "rejected_tokens",
                                   "human_label" (the latest `flywheel browse` label, or null)},
                      "suggestions": {"preference": {"value": "chosen", "score": null, "agent": "flywheel pairs <sid>"}},
                      "responses": {}, "vectors": {}}
    records.parquet  the same columns, for `datasets.load_dataset("parquet", ...)`
    settings.json    the dataset settings those records fit: text fields prompt/chosen/rejected, a label question
                     "preference" (chosen | rejected | tie), and the metadata properties with their types

Loading them (argilla is not a flywheel dependency):

    settings = rg.Settings(fields=[rg.TextField(name=n) for n in ("prompt", "chosen", "rejected")],
                           questions=[rg.LabelQuestion(name="preference", labels=["chosen", "rejected", "tie"])],
                           metadata=[rg.FloatMetadataProperty(name="margin"), ...])   # as in settings.json
    ds = rg.Dataset(name="pairs", settings=settings).create()
    ds.records.log([rg.Record(id=r["id"], fields=r["fields"], metadata=r["metadata"],
                              suggestions=[rg.Suggestion(q, s["value"], agent=s["agent"])
                                           for q, s in r["suggestions"].items()])
                    for r in map(json.loads, open("records.jsonl"))])

The records are written by DuckDB's COPY straight from the registry (opened read-only), so 250k pairs take seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..registry import Registry
from .queries import has_table, stages_of

METADATA = {"pair_id": "terms", "prompt_id": "terms", "chosen_id": "terms", "rejected_id": "terms", "run_id": "terms",
            "iteration": "integer", "margin": "float", "chosen_score": "float", "rejected_score": "float",
            "chosen_tokens": "integer", "rejected_tokens": "integer", "human_label": "terms"}


def resolve(reg: Registry, which: str) -> str:
    """The pairs stage run id that WHICH (RUN:ITERATION, ITERATION of the newest run, or a stage run id) names."""
    if reg.scalar("SELECT count(*) FROM stage_runs WHERE stage_run_id = ? AND stage = 'pairs'", [which]):
        return which
    run, _, t = which.rpartition(":")
    if not t.isdigit():
        raise ValueError(f"--export-argilla {which!r}: give RUN_ID:ITERATION, ITERATION or a pairs stage run id")
    run = run or reg.scalar("SELECT run_id FROM runs ORDER BY created_at DESC, run_id LIMIT 1")
    sid = stages_of(reg, run, int(t)).get("pairs") if run else None
    if sid is None:
        raise ValueError(f"--export-argilla {which!r}: run {run!r} has no pairs stage in iteration {t}")
    return sid


def export_argilla(reg: Registry, which: str, out: Path) -> dict:
    """Write records.jsonl, records.parquet and settings.json for the pairs WHICH names; returns what was written."""
    sid = resolve(reg, which)
    out.mkdir(parents=True, exist_ok=True)
    label = ("(SELECT l.label FROM pair_labels l WHERE l.pair_id = pr.pair_id "
             "ORDER BY l.created_at DESC, l.label_id DESC LIMIT 1)") if has_table(reg, "pair_labels") else "NULL"
    agent = f"flywheel pairs {sid}".replace("'", "''")
    select = f"""
        SELECT pr.pair_id AS id,
               {{'prompt': p.text, 'chosen': ch.text, 'rejected': rj.text}} AS fields,
               {{'pair_id': pr.pair_id, 'prompt_id': pr.prompt_id, 'chosen_id': pr.chosen_id,
                 'rejected_id': pr.rejected_id, 'run_id': pr.run_id, 'iteration': pr.iteration,
                 'margin': pr.chosen_score - pr.rejected_score, 'chosen_score': pr.chosen_score,
                 'rejected_score': pr.rejected_score, 'chosen_tokens': ch.num_tokens,
                 'rejected_tokens': rj.num_tokens, 'human_label': {label}}} AS metadata,
               {{'preference': {{'value': 'chosen', 'score': NULL::DOUBLE, 'agent': '{agent}'}}}} AS suggestions,
               MAP {{}}::MAP(VARCHAR, VARCHAR) AS responses, MAP {{}}::MAP(VARCHAR, VARCHAR) AS vectors
        FROM pairs pr JOIN prompts p USING (prompt_id)
        JOIN candidates ch ON ch.candidate_id = pr.chosen_id JOIN candidates rj ON rj.candidate_id = pr.rejected_id
        WHERE pr.stage_run_id = '{sid.replace("'", "''")}' ORDER BY pr.pair_id"""
    reg.con.execute(f"COPY ({select}) TO '{_q(out / 'records.jsonl')}' (FORMAT json)")
    reg.con.execute(f"COPY ({select}) TO '{_q(out / 'records.parquet')}' (FORMAT parquet)")
    n = reg.scalar("SELECT count(*) FROM pairs WHERE stage_run_id = ?", [sid])
    settings = {
        "guidelines": "Is the chosen response better than the rejected one for this prompt?",
        "fields": [{"name": n_, "type": "text", "required": True} for n_ in ("prompt", "chosen", "rejected")],
        "questions": [{"name": "preference", "type": "label_selection", "labels": ["chosen", "rejected", "tie"],
                       "required": True}],
        "metadata": [{"name": k, "type": v} for k, v in METADATA.items()],
    }
    (out / "settings.json").write_text(json.dumps(settings, indent=2))
    return {"pairs_stage_run_id": sid, "records": n, "files": ["records.jsonl", "records.parquet", "settings.json"]}


def _q(path: Path) -> str:
    return str(path).replace("'", "''")
