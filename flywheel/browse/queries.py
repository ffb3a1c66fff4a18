"""The SQL behind `flywheel browse`: runs, an iteration's pairs (filtered, sorted, paged in SQL), one pair's labels,
any id's row, and the one write, a review label.

    stages_of(reg, run_id, t)                 # {"pairs": sid, "judge": sid, ...} of a run iteration
    rows, total = pairs_page(reg, sids, PairQuery(sort="-margin", q="paris", page=2))
    add_label(root, pair_id, "agree", note, who)   # RegistryBusyError / RegistryLockedError while a run holds it

A page of pairs is two steps: the keys (pair id plus the sort and filter columns: margin, lengths, judge spread;
computed once per pairs stage run and kept in memory, `keys`) filtered, ordered and cut with LIMIT/OFFSET in DuckDB,
then the texts and judge samples of those few pairs, looked up by key (`details`).
"""

from __future__ import annotations

import getpass
import json
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from ..registry import Registry, now
from ..registry.lock import RegistryBusyError, is_locked, read_holder

LABELS = ("agree", "disagree", "flag")
PREVIEW = 160  # characters of each text in the table

# sort key -> SQL expression over the keys query's columns
SORTS = {"margin": "margin", "ratio": "ratio", "spread": "spread", "chosen": "chosen_score",
         "rejected": "rejected_score", "pair": "pair_id"}
LENGTH_FILTERS = {"chosen": "ch_tokens > rj_tokens", "rejected": "ch_tokens < rj_tokens",
                  "equal": "ch_tokens = rj_tokens"}
WRITE_WAIT_S = 3.0  # how long a label waits for the DuckDB file before saying the registry is busy


@dataclass
class PairQuery:
    """What the pairs table shows: sort ("-margin": descending), filters, page (from 1) and page size."""

    sort: str = "-margin"
    min_margin: float | None = None
    max_margin: float | None = None
    longer: str = ""            # chosen | rejected | equal: which text has more tokens
    min_spread: float | None = None   # judge disagreement: the larger, over both sides, of max - min sample score
    q: str = ""                 # text search in prompt, chosen and rejected (case-insensitive)
    page: int = 1
    size: int = 50
    errors: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, params: dict[str, str]) -> "PairQuery":
        """From the page's query string; bad values are dropped and named in `errors`."""
        pq = cls()
        for name in ("min_margin", "max_margin", "min_spread"):
            if params.get(name, "").strip():
                try:
                    setattr(pq, name, float(params[name]))
                except ValueError:
                    pq.errors.append(f"{name}: not a number: {params[name]!r}")
        for name in ("page", "size"):
            if params.get(name, "").strip():
                try:
                    setattr(pq, name, max(1, int(params[name])))
                except ValueError:
                    pq.errors.append(f"{name}: not a whole number: {params[name]!r}")
        pq.size = min(pq.size, 500)
        sort = params.get("sort", pq.sort)
        if sort.lstrip("-") in SORTS:
            pq.sort = sort
        else:
            pq.errors.append(f"sort: one of {', '.join(SORTS)} (with - for descending), not {sort!r}")
        longer = params.get("longer", "")
        if longer in LENGTH_FILTERS:
            pq.longer = longer
        elif longer:
            pq.errors.append(f"longer: one of {', '.join(LENGTH_FILTERS)}, not {longer!r}")
        pq.q = params.get("q", "").strip()
        return pq

    def params(self, **change) -> dict:
        """The query string of this view (with `change` applied): for links to other pages and sorts."""
        values = {"sort": self.sort, "min_margin": self.min_margin, "max_margin": self.max_margin,
                  "longer": self.longer, "min_spread": self.min_spread, "q": self.q, "page": self.page,
                  "size": self.size, **change}
        return {k: v for k, v in values.items() if v not in (None, "")}


def has_table(reg: Registry, name: str) -> bool:
    """Whether the registry has the table (a registry no writer of this version has opened lacks pair_labels)."""
    return bool(reg.scalar("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]))


def runs(reg: Registry) -> list[dict]:
    return reg.rows("SELECT r.run_id, r.name, r.status, r.created_at, r.finished_at, "
                    "(SELECT count(*) FROM iterations i WHERE i.run_id = r.run_id) AS iterations "
                    "FROM runs r ORDER BY r.created_at DESC, r.run_id")


def stages_of(reg: Registry, run_id: str, t: int) -> dict[str, str]:
    """stage -> stage_run_id of a run iteration (stages reused from another run included)."""
    return {r["stage"]: r["stage_run_id"] for r in reg.rows(
        "SELECT stage, stage_run_id FROM run_stages WHERE run_id = ? AND iteration = ?", [run_id, t])}


# Every pair of a pairs stage run with its sort and filter columns; computed once per stage run and kept (see keys).
KEYS_SQL = """
WITH spreads AS (SELECT candidate_id, max(score) - min(score) AS spread FROM judgments
                 WHERE stage_run_id = $judge GROUP BY candidate_id)
SELECT pr.pair_id, pr.chosen_score, pr.rejected_score, pr.chosen_score - pr.rejected_score AS margin,
       ch.num_tokens AS ch_tokens, rj.num_tokens AS rj_tokens, ch.num_tokens / greatest(rj.num_tokens, 1) AS ratio,
       greatest(cs.spread, rs.spread) AS spread
FROM pairs pr JOIN candidates ch ON ch.candidate_id = pr.chosen_id JOIN candidates rj ON rj.candidate_id = pr.rejected_id
LEFT JOIN spreads cs ON cs.candidate_id = pr.chosen_id LEFT JOIN spreads rs ON rs.candidate_id = pr.rejected_id
WHERE pr.stage_run_id = $pairs
"""
_keys: OrderedDict[tuple, pa.Table] = OrderedDict()
_keys_guard = threading.Lock()
KEYS_KEPT = 8  # stage runs whose keys stay in memory (250k pairs: ~15 MB each)


def keys(reg: Registry, pairs_sid: str, judge_sid: str | None) -> pa.Table:
    """KEYS_SQL's rows as an Arrow table, kept in memory while the stage's pairs are unchanged (same count and newest
    created_at), so sorting by length ratio or judge spread costs one join and one aggregate per stage, not per page."""
    n, newest = reg.con.execute("SELECT count(*), max(created_at) FROM pairs WHERE stage_run_id = ?",
                                [pairs_sid]).fetchall()[0]
    key = (str(reg.path), pairs_sid, judge_sid, n, newest)
    with _keys_guard:
        if key in _keys:
            _keys.move_to_end(key)
            return _keys[key]
    table = reg.con.sql(KEYS_SQL, params={"pairs": pairs_sid, "judge": judge_sid}).to_arrow_table()
    with _keys_guard:
        _keys[key] = table
        while len(_keys) > KEYS_KEPT:
            _keys.popitem(last=False)
    return table


# The candidates and prompts a text search finds, each text scanned once (ILIKE: twice as fast as lower + contains).
TEXT_CTES = ("WITH hit AS MATERIALIZED (SELECT candidate_id FROM candidates WHERE text ILIKE $q ESCAPE '\\'), "
             "hitp AS MATERIALIZED (SELECT prompt_id FROM prompts WHERE text ILIKE $q ESCAPE '\\') ")


def _where(pq: PairQuery) -> tuple[str, dict]:
    """The filters of `pq` over the keys table; a text search needs TEXT_CTES before the query."""
    where, params = [], {}
    for name, op in (("min_margin", ">="), ("max_margin", "<="), ("min_spread", ">=")):
        if getattr(pq, name) is not None:
            where.append(f"{'spread' if name == 'min_spread' else 'margin'} {op} ${name}")
            params[name] = getattr(pq, name)
    if pq.longer:
        where.append(LENGTH_FILTERS[pq.longer])
    if pq.q:
        pattern = "%" + pq.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where.append("pair_id IN (SELECT pair_id FROM pairs WHERE stage_run_id = $pairs AND (chosen_id IN "
                     "(SELECT * FROM hit) OR rejected_id IN (SELECT * FROM hit) OR prompt_id IN (SELECT * FROM hitp)))")
        params["q"] = pattern
    return (" WHERE " + " AND ".join(where)) if where else "", params


def pairs_page(reg: Registry, sids: dict[str, str], pq: PairQuery) -> tuple[list[dict], int]:
    """One page of an iteration's pairs under `pq`, and how many pairs pass its filters."""
    pairs_sid, judge_sid = sids.get("pairs"), sids.get("judge")
    if pairs_sid is None:
        return [], 0
    reg.con.register("pair_keys", keys(reg, pairs_sid, judge_sid))
    try:
        where, params = _where(pq)
        if "q" in params:
            params["pairs"] = pairs_sid
        ctes = TEXT_CTES if "q" in params else ""
        order = f"{SORTS[pq.sort.lstrip('-')]} {'DESC' if pq.sort.startswith('-') else 'ASC'} NULLS LAST, pair_id"
        page = reg.rows(f"{ctes}SELECT pair_id, count(*) OVER () AS total FROM pair_keys{where} ORDER BY {order} "
                        f"LIMIT {pq.size} OFFSET {(pq.page - 1) * pq.size}", params)
        total = page[0]["total"] if page else reg.scalar(f"{ctes}SELECT count(*) FROM pair_keys{where}", params)
    finally:
        reg.con.unregister("pair_keys")
    return details(reg, [k["pair_id"] for k in page], judge_sid), total


def details(reg: Registry, ids: list[str], judge_sid: str | None) -> list[dict]:
    """The table's columns for these pairs, in this order: previews, scores, margin, lengths, judge samples, signals.
    Each table is read once for the page's keys (`_listed`)."""
    if not ids:
        return []
    pairs = reg.rows(*_listed("SELECT pair_id, prompt_id, chosen_id, rejected_id, chosen_score, rejected_score, "
                             "chosen_score - rejected_score AS margin, signals FROM pairs", "pair_id", ids))
    cids = [c for p in pairs for c in (p["chosen_id"], p["rejected_id"])]
    cands = {r["candidate_id"]: r for r in reg.rows(*_listed(
        f"SELECT candidate_id, substr(text, 1, {PREVIEW}) AS text, num_tokens FROM candidates", "candidate_id", cids))}
    prompts = {r["prompt_id"]: r["text"] for r in reg.rows(*_listed(
        f"SELECT prompt_id, substr(text, 1, {PREVIEW}) AS text FROM prompts", "prompt_id",
        sorted({p["prompt_id"] for p in pairs})))}
    samples = {r["candidate_id"]: r for r in reg.rows(
        "SELECT candidate_id, list(score ORDER BY sample_index) AS scores, max(score) - min(score) AS spread "
        "FROM judgments WHERE stage_run_id = ? AND candidate_id IN (SELECT unnest(?)) GROUP BY candidate_id",
        [judge_sid, cids])} if judge_sid else {}
    by_id = {}
    for p in pairs:
        ch, rj = cands.get(p["chosen_id"], {}), cands.get(p["rejected_id"], {})
        cs, rs = samples.get(p["chosen_id"], {}), samples.get(p["rejected_id"], {})
        spreads = [x["spread"] for x in (cs, rs) if x.get("spread") is not None]
        by_id[p["pair_id"]] = {
            **p, "signals": json.loads(p["signals"] or "{}"), "prompt": prompts.get(p["prompt_id"], ""),
            "chosen": ch.get("text", ""), "rejected": rj.get("text", ""), "ch_tokens": ch.get("num_tokens", 0),
            "rj_tokens": rj.get("num_tokens", 0), "ratio": ch.get("num_tokens", 0) / max(rj.get("num_tokens", 0), 1),
            "ch_samples": cs.get("scores"), "rj_samples": rs.get("scores"), "spread": max(spreads, default=None)}
    return [by_id[i] for i in ids if i in by_id]


def _listed(select: str, column: str, values: list) -> tuple[str, list]:
    """`select WHERE column IN (the values)`: one semi-join (100 UNION ALL point lookups plan slower here)."""
    return f"{select} WHERE {column} IN (SELECT unnest(?))", [values]


def labels(reg: Registry, pair_id: str) -> list[dict]:
    """Every label of a pair, newest first."""
    if not has_table(reg, "pair_labels"):
        return []
    return reg.rows("SELECT * FROM pair_labels WHERE pair_id = ? ORDER BY created_at DESC, label_id", [pair_id])


def find_row(reg: Registry, ident: str) -> tuple[str, dict] | None:
    """(table, row) for a prompt, candidate, judgment, reward, stage run or run id: ids `lineage` does not take."""
    for table, key in (("prompts", "prompt_id"), ("candidates", "candidate_id"), ("judgments", "judgment_id"),
                       ("rewards", "reward_id"), ("stage_runs", "stage_run_id"), ("runs", "run_id"),
                       ("templates", "template_hash")):
        found = reg.rows(f"SELECT * FROM {table} WHERE {key} = ?", [ident])
        if found:
            return table, found[0]
    return None


def pairs_using(reg: Registry, table: str, ident: str, limit: int = 20) -> list[str]:
    """Pair ids that use a prompt or candidate (for a prompt's or candidate's page)."""
    where = {"prompts": "prompt_id = $id", "candidates": "chosen_id = $id OR rejected_id = $id"}.get(table)
    if where is None:
        return []
    return [r["pair_id"] for r in reg.rows(f"SELECT pair_id FROM pairs WHERE {where} ORDER BY pair_id "
                                           f"LIMIT {limit}", {"id": ident})]


def add_label(root: str | Path, pair_id: str, label: str, note: str = "", who: str = "") -> dict:
    """Write one review label: the registry's one write from `flywheel browse`. Refuses at once, with
    RegistryBusyError, while a run holds the registry's lock, so a run is never made to wait on a person; else opens
    the file for writing for the insert only (RegistryLockedError if another process keeps it past WRITE_WAIT_S).
    Raises ValueError for an unknown pair or label."""
    if label not in LABELS:
        raise ValueError(f"label: one of {', '.join(LABELS)}, not {label!r}")
    if is_locked(root):
        raise RegistryBusyError(Path(root), read_holder(root))
    row = {"label_id": uuid.uuid4().hex, "pair_id": pair_id, "label": label, "note": note.strip() or None,
           "who": who.strip() or _os_user(), "created_at": now()}
    with Registry(root, wait_s=WRITE_WAIT_S) as reg:  # creates pair_labels in a registry made before it existed
        if not reg.scalar("SELECT count(*) FROM pairs WHERE pair_id = ?", [pair_id]):
            raise ValueError(f"no pair {pair_id!r} in {reg.path}")
        reg.insert("pair_labels", [row])
    return row


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
