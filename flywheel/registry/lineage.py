"""Lineage: the whole history of one preference pair, model or dataset version, answered by keyed SQL on the registry.

    lineage(reg, "pr-1a2b...")            # a pair: prompt, chosen/rejected candidates, judge samples, rewards, rule,
                                          # the dataset versions it sits in, the models trained on it
    lineage(reg, "M2", run="demo-...")    # a model (id, or name + run): the chain of models and datasets to the base
    lineage(reg, "train-3f2a...")         # a dataset version: what it was derived from, which models consumed it
    render(result)                        # the same as a rich Tree

Every answer is a dict of plain values (JSON columns parsed), so `json.dumps(result, default=str)` is its JSON form.
A pair takes about ten point queries on primary keys or small tables; see bench/lineage_bench.py for timings.
"""

from __future__ import annotations

import json
from typing import Any

from rich.tree import Tree

from ..training import TRAINERS
from .datasets import stage_versions
from .store import Registry

# Trainers that consume the pairs of their iteration (a model of another kind is linked by its dataset_version), and
# kind -> (stage, dataset) a model of that kind was trained on, used when its dataset_version names no version in the
# manifest: both from the trainer table.
PAIR_TRAINER_KINDS = tuple(name for name, t in TRAINERS.items() if "pairs" in t.consumes)
TRAINED_ON = {name: t.trained_on for name, t in TRAINERS.items()}

MODEL_COLS = "model_id, name, kind, iteration, run_id, parent_id, ref_model_id, dataset_version, stage_run_id, path"


class LineageError(ValueError):
    """The id names nothing in the registry, or names a model ambiguously."""


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _in(values: list) -> str:
    """Placeholders for an IN list of keys."""
    return "(" + ", ".join("?" * len(values)) + ")" if values else "(NULL)"


def _keyed(select: str, column: str, values: list, where: str = "",
           params: list | None = None) -> tuple[str, list]:
    """`select WHERE column = ? [AND where]` once per value, joined by UNION ALL: each branch is a point lookup
    that uses the column's index or, without one, its zone maps (rows are written in key order). An IN list
    would scan the whole table instead."""
    branches = [f"{select} WHERE {column} = ?" + (f" AND {where}" if where else "") for _ in values]
    return " UNION ALL ".join(branches), [x for v in values for x in [v, *(params or [])]]


def _models_sql() -> str:
    return (f"SELECT {', '.join('m.' + c for c in MODEL_COLS.split(', '))}, m.metrics, s.status AS stage_status, "
            "s.started_at, s.finished_at FROM models m LEFT JOIN stage_runs s ON s.stage_run_id = m.stage_run_id")


# --- a pair ----------------------------------------------------------------------------------------------------------
_RUN_STAGES_SQL = """
SELECT run_id, iteration, stage, stage_run_id FROM run_stages
WHERE (run_id, iteration) IN (SELECT run_id, iteration FROM run_stages
                              WHERE stage_run_id = $sid OR (run_id = $run AND iteration = $iteration))
ORDER BY run_id <> $run, run_id, stage
"""


def pair_lineage(reg: Registry, pair_id: str) -> dict | None:
    """About ten queries, each a primary-key lookup, a keyed lookup, or a read of a small table."""
    found = reg.rows("SELECT * FROM pairs WHERE pair_id = ?", [pair_id])
    if not found:
        return None
    pair = found[0]
    signals = _json(pair.pop("signals")) or {}
    # The stages of every run iteration that used this pairs stage (the pair's own run first).
    run_stages = reg.rows(_RUN_STAGES_SQL, {"sid": pair["stage_run_id"], "run": pair["run_id"],
                                            "iteration": pair["iteration"]})
    stages: dict[str, str] = {}
    runs_of: dict[str, list[str]] = {}
    for r in run_stages:
        stages.setdefault(r["stage"], r["stage_run_id"])
        runs_of.setdefault(r["stage_run_id"], []).append(r["run_id"])

    prompt = reg.rows("SELECT * FROM prompts WHERE prompt_id = ?", [pair["prompt_id"]])[0]
    shots = list(prompt.get("few_shot_ids") or [])
    few_shot = {r["prompt_id"]: r for r in reg.rows(*_keyed("SELECT prompt_id, source, text FROM prompts",
                                                            "prompt_id", shots))} if shots else {}
    prompt["few_shot"] = [few_shot.get(i, {"prompt_id": i, "source": None, "text": None}) for i in shots]

    cids = [pair["chosen_id"], pair["rejected_id"]]
    cands = {r["candidate_id"]: r for r in reg.rows(*_keyed("SELECT * FROM candidates", "candidate_id", cids))}
    judge_sid = stages.get("judge")
    sql, params = _keyed("SELECT judgment_id, candidate_id, sample_index, raw_text, score, parse_error, "
                         "judge_model_id, template_hash, sampling, stage_run_id FROM judgments", "candidate_id", cids,
                         "stage_run_id = ?" if judge_sid else "", [judge_sid] if judge_sid else [])
    judgments = reg.rows(f"SELECT j.*, t.name AS template_name FROM ({sql}) j LEFT JOIN templates t "
                         "USING (template_hash) ORDER BY j.candidate_id, j.sample_index", params)
    reward_sid = stages.get("reward") or stages.get("rewards")
    rewards = reg.rows(*_keyed(
        "SELECT reward_id, candidate_id, signal, value, error, details, policy_model_id, ref_model_id, stage_run_id "
        "FROM rewards", "candidate_id", cids, "stage_run_id = ?" if reward_sid else "",
        [reward_sid] if reward_sid else [])) if cids else []
    rewards.sort(key=lambda r: (r["candidate_id"], r["signal"]))
    steps = _steps(reg, cids, reward_sid) if cids and reward_sid else []

    sids = sorted({prompt["stage_run_id"], pair["stage_run_id"], *(c["stage_run_id"] for c in cands.values()),
                   *(j["stage_run_id"] for j in judgments), *(r["stage_run_id"] for r in rewards)})
    manifests = reg.rows(
        "SELECT version_id, name, run_id, iteration, stage_run_id, num_rows, sha256, path, derived_from, created_at "
        f"FROM dataset_versions WHERE stage_run_id IN {_in(sids)} ORDER BY name, created_at", sids)
    versions: dict[str, dict[str, str]] = {}
    for v in manifests:
        versions.setdefault(v["stage_run_id"], {})[v["name"]] = v["version_id"]  # the latest of each name
    pair_versions = sorted(versions.get(pair["stage_run_id"], {}).values())

    used = sorted({prompt["model_id"], *(c["model_id"] for c in cands.values()),
                   *(j["judge_model_id"] for j in judgments), *(r["policy_model_id"] for r in rewards),
                   *(r["ref_model_id"] for r in rewards)} - {None})
    trainer_sids = sorted(runs_of)
    models = reg.rows(f"{_models_sql()} WHERE m.model_id IN {_in(used)} OR m.dataset_version IN "
                      f"{_in(pair_versions)} OR m.stage_run_id IN {_in(trainer_sids)} ORDER BY m.iteration, m.model_id",
                      used + pair_versions + trainer_sids)
    by_id = {m["model_id"]: m for m in models}
    trained = [{**m, "metrics": _json(m["metrics"]), "runs": sorted(set(runs_of.get(m["stage_run_id"], [])))}
               for m in models if m["dataset_version"] in pair_versions
               or (m["kind"] in PAIR_TRAINER_KINDS and m["stage_run_id"] in runs_of)]

    def model(model_id: str | None) -> dict | None:
        m = by_id.get(model_id)
        return {k: m[k] for k in MODEL_COLS.split(", ")} if m else None

    def side(cid: str, role: str) -> dict:
        c = dict(cands.get(cid) or {"candidate_id": cid})
        c["sampling"] = _json(c.get("sampling"))
        c["model"] = model(c.get("model_id"))
        c["dataset_versions"] = versions.get(c.get("stage_run_id"), {})
        c["judgments"] = [{**j, "sampling": _json(j["sampling"]), "judge_model": model(j["judge_model_id"]),
                           "dataset_versions": versions.get(j["stage_run_id"], {})}
                          for j in judgments if j["candidate_id"] == cid]
        c["rewards"] = [{**r, "details": _json(r["details"]), "dataset_versions": versions.get(r["stage_run_id"], {})}
                        for r in rewards if r["candidate_id"] == cid]
        c["steps"] = [x for x in steps if x["candidate_id"] == cid]
        c["signals"] = signals.get(role, {})
        c["score"] = pair[f"{role}_score"]
        return c

    prompt["model"] = model(prompt["model_id"])
    prompt["dataset_versions"] = versions.get(prompt["stage_run_id"], {})
    return {
        "kind": "pair",
        "pair": pair,
        "prompt": prompt,
        "chosen": side(pair["chosen_id"], "chosen"),
        "rejected": side(pair["rejected_id"], "rejected"),
        "rule": {k: v for k, v in signals.items() if k not in ("chosen", "rejected")},
        "datasets": [v for v in manifests if v["version_id"] in pair_versions],
        "trained": trained,
    }


def _steps(reg: Registry, cids: list[str], reward_sid: str) -> list[dict]:
    """The candidates' steps (process rewards), each with its step rewards {signal: value} and their errors."""
    try:
        rows = reg.rows(*_keyed(
            "SELECT s.candidate_id, s.step_index, s.text, s.start_char, s.end_char, s.prefix_hash, "
            "map_from_entries(list(struct_pack(k := r.signal, v := r.value)) FILTER (WHERE r.signal IS NOT NULL)) "
            "AS scores, list(r.error) FILTER (WHERE r.error IS NOT NULL) AS errors FROM steps s LEFT JOIN step_rewards r "
            "USING (step_id)", "s.candidate_id", cids, "s.stage_run_id = ? GROUP BY ALL", [reward_sid]))
    except Exception:  # a registry from before process rewards has no steps table (a reader does not create it)
        return []
    rows.sort(key=lambda r: (r["candidate_id"], r["step_index"]))
    return [{**r, "scores": dict(r["scores"] or {}), "errors": r["errors"] or []} for r in rows]


def _consumers(reg: Registry, version_ids: list[str]) -> list[dict]:
    """Models trained on any of these versions (by their dataset_version), with their training stage's ledger."""
    rows = reg.rows(f"{_models_sql()} WHERE m.dataset_version IN {_in(version_ids)} ORDER BY m.iteration, m.model_id",
                    version_ids) if version_ids else []
    for r in rows:
        r["metrics"] = _json(r["metrics"])
    return rows


# --- models and dataset versions -------------------------------------------------------------------------------------
_CHAIN_SQL = f"""
WITH RECURSIVE chain AS (
    SELECT {MODEL_COLS}, 0 AS depth FROM models WHERE model_id = ?
    UNION ALL
    SELECT {', '.join('m.' + c for c in MODEL_COLS.split(', '))}, chain.depth + 1
    FROM models m JOIN chain ON m.model_id = chain.parent_id
)
SELECT * FROM chain ORDER BY depth
"""

_DAG_SQL = """
WITH RECURSIVE d(version_id) AS (
    SELECT unnest(?::VARCHAR[])
    UNION
    SELECT unnest(v.derived_from) FROM dataset_versions v JOIN d USING (version_id)
)
SELECT v.version_id, v.name, v.run_id, v.iteration, v.stage_run_id, s.stage, s.model_id, v.num_rows, v.sha256,
       v.path, v.derived_from, v.created_at
FROM d JOIN dataset_versions v USING (version_id) LEFT JOIN stage_runs s USING (stage_run_id)
ORDER BY v.iteration, v.name, v.version_id
"""


def _dag(reg: Registry, roots: list[str]) -> dict[str, dict]:
    return {r["version_id"]: r for r in reg.rows(_DAG_SQL, [roots])} if roots else {}


def model_lineage(reg: Registry, model_id: str) -> dict | None:
    chain = reg.rows(_CHAIN_SQL, [model_id])
    if not chain:
        return None
    # What each model was trained on: its own dataset_version if the manifest has it, else its kind's dataset in
    # its run iteration.
    sids = [m["stage_run_id"] for m in chain]
    stages = sorted({s for s, _ in TRAINED_ON.values()})
    siblings = reg.rows(
        "SELECT DISTINCT ms.stage_run_id AS model_sid, t.stage, t.stage_run_id FROM run_stages ms "
        "JOIN run_stages t ON t.run_id = ms.run_id AND t.iteration = ms.iteration "
        f"WHERE ms.stage_run_id IN {_in(sids)} AND t.stage IN {_in(stages)}", sids + stages)
    versions = stage_versions(reg, sorted({s["stage_run_id"] for s in siblings}))
    named = sorted({m["dataset_version"] for m in chain} - {None})
    known = {r["version_id"] for r in reg.rows(
        f"SELECT version_id FROM dataset_versions WHERE version_id IN {_in(named)}", named)} if named else set()
    for m in chain:
        trained_on = {m["dataset_version"]} & known
        if not trained_on and m["kind"] in TRAINED_ON:
            stage, name = TRAINED_ON[m["kind"]]
            trained_on = {versions.get(s["stage_run_id"], {}).get(name) for s in siblings
                          if s["model_sid"] == m["stage_run_id"] and s["stage"] == stage} - {None}
        m["trained_on"] = sorted(trained_on)
    roots = sorted({v for m in chain for v in m["trained_on"]})
    return {"kind": "model", "model": chain[0], "chain": chain, "datasets": _dag(reg, roots)}


def version_lineage(reg: Registry, version_id: str) -> dict | None:
    dag = _dag(reg, [version_id])
    if version_id not in dag:
        return None
    return {"kind": "dataset", "version": dag[version_id], "datasets": dag,
            "trained": _consumers(reg, [version_id])}


def resolve_model(reg: Registry, name: str, run: str | None) -> str | None:
    """The model id for a model name (PT, M1, M2, ...) in a run; without a run, the name must be unambiguous."""
    rows = reg.rows(
        "SELECT DISTINCT m.model_id, m.run_id FROM models m WHERE m.name = $name AND ($run IS NULL OR m.run_id = $run "
        "OR m.stage_run_id IN (SELECT stage_run_id FROM run_stages WHERE run_id = $run))",
        {"name": name, "run": run})
    if len(rows) > 1:
        raise LineageError(f"model name {name!r} is in several runs ({', '.join(sorted(r['run_id'] for r in rows))}); "
                           "pass --run RUN")
    return rows[0]["model_id"] if rows else None


def lineage(reg: Registry, ident: str, run: str | None = None) -> dict:
    """The lineage of a pair id, a model id, a model name (with `run` if ambiguous) or a dataset version id."""
    for find in (pair_lineage, model_lineage, version_lineage):
        result = find(reg, ident)
        if result is not None:
            return result
    model_id = resolve_model(reg, ident, run)
    if model_id is not None:
        return model_lineage(reg, model_id)
    raise LineageError(f"{ident!r} is not a pair id, model id, model name{' in run ' + run if run else ''} "
                       f"or dataset version in {reg.path}")


# --- rendering -------------------------------------------------------------------------------------------------------
def _model_label(m: dict | None) -> str:
    if not m:
        return "?"
    return f"{m['name']} ({m['kind']}, iteration {m['iteration']}, {m['model_id']})"


def _short(text: Any, n: int = 100) -> str:
    s = str(text).replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."


def _esc(text: Any) -> str:
    return str(text).replace("[", "\\[")


def _versions_label(versions: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(versions.items())) or "-"


def _render_pair(r: dict) -> Tree:
    pair, prompt = r["pair"], r["prompt"]
    root = Tree(f"[bold]pair[/] {pair['pair_id']}  (run {pair['run_id']}, iteration {pair['iteration']}, "
                f"chosen {pair['chosen_score']:.3g} vs rejected {pair['rejected_score']:.3g})")
    p = root.add(f"[bold]prompt[/] {prompt['prompt_id']} ({prompt['source']}): {_esc(_short(prompt['text']))}")
    if prompt["source"] == "seed":
        p.add(f"seed {prompt['seed_id']}; reference: {_esc(_short(prompt['reference']))}")
    elif prompt["source"] == "file":
        p.add(f"from self_instruct.prompts_file; reference: {_esc(_short(prompt['reference']))}")
    else:
        p.add(f"written by {_model_label(prompt['model'])}")
        shots = p.add(f"from {len(prompt['few_shot'])} few-shot example prompt(s)")
        for s in prompt["few_shot"]:
            shots.add(f"{s['prompt_id']}: {_esc(_short(s['text'], 80))}")
    p.add(f"datasets: {_versions_label(prompt['dataset_versions'])}")
    for role in ("chosen", "rejected"):
        c = r[role]
        node = root.add(f"[bold]{role}[/] {c['candidate_id']} (score {c['score']:.3g}): {_esc(_short(c.get('text')))}")
        node.add(f"model {_model_label(c.get('model'))}, backend {c.get('backend')}, sampling {c.get('sampling')}, "
                 f"seed {c.get('seed')}, sample {c.get('sample_index')}")
        js = node.add(f"judge samples ({len(c['judgments'])})")
        for j in c["judgments"]:
            verdict = f"score {j['score']:g}" if j["score"] is not None else f"[red]parse error: {j['parse_error']}[/]"
            js.add(f"#{j['sample_index']} {verdict}  template {j['template_name'] or ''} {j['template_hash']}  "
                   f"judge {_model_label(j['judge_model'])}: {_esc(_short(j['raw_text'], 80))}")
        if c["rewards"]:
            rw = node.add("rewards")
            for x in c["rewards"]:
                value = f"{x['value']:.4g}" if x["value"] is not None else f"[red]error: {x['error']}[/]"
                rw.add(f"{x['signal']}: {value}  {_esc(x['details']) if x['details'] else ''}")
        if c["steps"]:
            sn = node.add(f"steps ({len(c['steps'])})")
            for x in c["steps"]:
                scores = ", ".join(f"{k} {v:.3g}" if v is not None else f"{k} none"
                                   for k, v in sorted(x["scores"].items()))
                sn.add(f"#{x['step_index']} {_esc('[' + scores + ']')} {_esc(_short(x['text'], 80))}"
                       + (f"  [red]{_esc(x['errors'][0])}[/]" if x["errors"] else ""))
        if c["signals"]:
            node.add(f"signals: {_esc(c['signals'])}")
        node.add(f"datasets: {_versions_label(c['dataset_versions'])}")
    root.add(f"[bold]rule[/] {_esc(r['rule']) if r['rule'] else '(not recorded)'}")
    ds = root.add("[bold]in dataset versions[/]")
    for v in r["datasets"]:
        ds.add(f"{v['version_id']} ({v['num_rows']} rows) {v['path']}  "
               f"derived from {', '.join(v['derived_from'] or [])}")
    tr = root.add("[bold]trained into[/]")
    for m in r["trained"]:
        tr.add(f"{_model_label(m)} by stage {m['stage_run_id']} ({m['stage_status']}), "
               f"runs {', '.join(m['runs'] or [])}, on {m['dataset_version'] or 'its iteration pairs'}")
    if not r["trained"]:
        tr.add("(no model trained on it yet)")
    return root


def _add_dag(node: Tree, version_id: str, dag: dict, seen: set) -> None:
    v = dag.get(version_id)
    if v is None:
        node.add(f"{version_id} (not in the manifest)")
        return
    made = f", made by {v['model_id']}" if v["model_id"] else ""
    child = node.add(f"{version_id} ({v['num_rows']} rows, {v['stage'] or '?'} iteration {v['iteration']}{made})")
    if version_id in seen:
        if v["derived_from"]:
            child.add("... (shown above)")
        return
    seen.add(version_id)
    for up in v["derived_from"] or []:
        _add_dag(child, up, dag, seen)


def render(r: dict) -> Tree:
    """A rich Tree of a lineage result."""
    if r["kind"] == "pair":
        return _render_pair(r)
    if r["kind"] == "dataset":
        root = Tree(f"[bold]dataset[/] {r['version']['version_id']}")
        _add_dag(root, r["version"]["version_id"], r["datasets"], set())
        tr = root.add("[bold]trained into[/]")
        for m in r["trained"]:
            tr.add(_model_label(m))
        return root
    node = root = Tree(f"[bold]model[/] {_model_label(r['model'])}  path {r['model']['path']}")
    seen: set = set()
    for i, m in enumerate(r["chain"]):
        if i:
            node = node.add(f"[bold]from[/] {_model_label(m)}  path {m['path']}")
        for v in m["trained_on"]:
            _add_dag(node.add("trained on"), v, r["datasets"], seen)
        if m["dataset_version"] and m["dataset_version"] not in m["trained_on"]:
            node.add(f"records dataset_version {m['dataset_version']} (not in the manifest)")
        if m["ref_model_id"]:
            node.add(f"reference model {m['ref_model_id']}")
    return root
