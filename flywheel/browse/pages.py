"""The HTML of `flywheel browse`, rendered on the server: every text through `html.escape`, no scripts but the
label form's small one. URLs:

    /                          runs
    /run/RUN                   a run's iterations: the report's figures, human agreement, plots, monitors
    /run/RUN/T?sort=-margin&q= the pairs of iteration T (sort, filters, pages)
    /pair/PAIR                 one pair: texts side by side with their differences, judge samples, lineage, labels
    /id/ID                     any id: `flywheel lineage` as a tree, or the row of a prompt, candidate, stage run...
"""

from __future__ import annotations

import difflib
import json
import re
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from .queries import LABELS, SORTS, PairQuery

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1em 2em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}
th{background:#f3f3f3;text-align:left}tr:nth-child(even) td{background:#fafafa}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}.small{font-size:12px;color:#555}
.text{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:13px;background:#f8f8f8;padding:6px;
margin:0}.side{display:grid;grid-template-columns:1fr 1fr;gap:1em}
mark.del{background:#fdd}mark.ins{background:#dfd}.err{color:#b00}.busy{background:#fee;padding:8px;border:1px solid #b00}
.ok{background:#efe;padding:8px;border:1px solid #080}form.filters input{width:6em}form.filters input[name=q]{width:14em}
ul.tree{margin:0;padding-left:1.2em}nav{margin-bottom:1em}
"""


def _id(ident: Any) -> str:
    """An id as a link to its lineage page."""
    if ident in (None, ""):
        return "-"
    return f'<a href="/id/{quote(str(ident), safe="")}"><code>{escape(str(ident))}</code></a>'


def _num(value: Any, fmt: str = "{:.3g}") -> str:
    return "-" if value is None else escape(fmt.format(value))


def page(title: str, body: str, crumbs: list[tuple[str, str]] = ()) -> str:
    nav = " / ".join(['<a href="/">runs</a>', *(f'<a href="{escape(u)}">{escape(t)}</a>' for t, u in crumbs)])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)} - flywheel browse</title>"
            f"<style>{CSS}</style></head><body><nav>{nav}</nav><h1>{escape(title)}</h1>{body}</body></html>")


def error(status: int, message: str) -> str:
    cls = "busy" if status in (409, 503) else "err"
    return page(f"{status}", f'<p class="{cls}" id="message">{escape(message)}</p>')


def table(header: list[str], rows: list[list[str]], attrs: str = "") -> str:
    """An HTML table; `header` is escaped, cells are HTML already."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table {attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# --- runs and iterations -----------------------------------------------------------------------------------------
def runs_page(runs: list[dict]) -> str:
    rows = [[f'<a href="/run/{quote(r["run_id"], safe="")}">{escape(r["run_id"])}</a>', escape(r["name"]),
             escape(r["status"]), escape(str(r["created_at"])[:19]), escape(str(r["finished_at"] or "")[:19]),
             str(r["iterations"])] for r in runs]
    body = table(["run", "name", "status", "started", "finished", "iterations"], rows, 'id="runs"') if rows \
        else "<p>No runs in this registry yet.</p>"
    return page("Runs", body)


def run_page(run_id: str, iterations: list[dict], grid: tuple[list[str], list[list[str]]], warnings: list,
             images: list[str]) -> str:
    head, rows = grid
    links = ["pairs", *(f'<a href="/run/{quote(run_id, safe="")}/{it["iteration"]}">{it.get("pairs") or 0} pairs</a>'
                        for it in iterations)]
    human = ["judge vs human (labels)", *(_human(it) for it in iterations)]
    body = table(head, [[escape(c) for c in r] for r in rows] + [human, links], 'id="iterations"')
    if warnings:
        body += "<h2>Monitors that fired</h2><ul>" + "".join(
            f"<li>iteration {w.iteration}: <b>{escape(w.name)}</b> {escape(w.message)}</li>" for w in warnings) + "</ul>"
    if images:
        body += "<h2>Plots</h2>" + "".join(
            f'<p><a href="/png/{quote(run_id, safe="")}/{quote(n)}"><img src="/png/{quote(run_id, safe="")}/'
            f'{quote(n)}" alt="{escape(n)}" style="max-width:600px"></a></p>' for n in images)
    else:
        body += f"<p class='small'>No plots yet: <code>flywheel report {escape(run_id)}</code> writes them.</p>"
    return page(f"Run {run_id}", body, [(run_id, f"/run/{quote(run_id, safe='')}")])


def _human(it: dict) -> str:
    h = it.get("human_labels")
    if not h:
        return "-"
    share = it.get("human_agreement")
    return (f"{'-' if share is None else f'{share:.0%}'} agree "
            f"<span class='small'>({h['agree']} agree, {h['disagree']} disagree, {h['flag']} flag)</span>")


# --- the pairs of an iteration -----------------------------------------------------------------------------------
def _samples(scores: list | None) -> str:
    if scores is None:
        return "-"
    return ", ".join("<span class='err'>fail</span>" if s is None else escape(f"{s:g}") for s in scores)


def _signals(signals: dict) -> str:
    parts = []
    for side in ("chosen", "rejected"):
        values = {k: v for k, v in (signals.get(side) or {}).items() if k != "judge"}
        if values:
            parts.append(f"{side[0]}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, (int, float)) else f"{k} {v}"
                                                   for k, v in values.items()))
    return escape("; ".join(parts)) or "-"


def pairs_page(run_id: str, t: int, rows: list[dict], total: int, pq: PairQuery) -> str:
    base = f"/run/{quote(run_id, safe='')}/{t}"

    def link(text: str, **change) -> str:
        return f'<a href="{base}?{escape(urlencode(pq.params(**change)))}">{escape(text)}</a>'

    def sort_head(label: str, key: str) -> str:
        now = pq.sort.lstrip("-") == key
        arrow = (" ▼" if pq.sort.startswith("-") else " ▲") if now else ""
        return link(label + arrow, sort=key if pq.sort == f"-{key}" else f"-{key}", page=1)

    header = ["pair", "prompt", "chosen", "rejected", "chosen score", "rejected score", "margin", "tokens c/r",
              "ratio", "judge samples c | r", "spread", "signals"]
    sortable = {"pair": "pair", "chosen score": "chosen", "rejected score": "rejected", "margin": "margin",
                "ratio": "ratio", "spread": "spread"}
    head = "".join(f"<th>{sort_head(h, sortable[h]) if h in sortable else escape(h)}</th>" for h in header)
    body = "".join(
        f'<tr data-pair="{escape(r["pair_id"])}"><td><a href="/pair/{quote(r["pair_id"], safe="")}">'
        f'{escape(r["pair_id"])}</a></td><td>{escape(r["prompt"])}</td><td>{escape(r["chosen"])}</td>'
        f'<td>{escape(r["rejected"])}</td><td class="num">{_num(r["chosen_score"])}</td>'
        f'<td class="num">{_num(r["rejected_score"])}</td><td class="num margin">{_num(r["margin"], "{:.4f}")}</td>'
        f'<td class="num">{r["ch_tokens"]}/{r["rj_tokens"]}</td><td class="num">{_num(r["ratio"], "{:.2f}")}</td>'
        f'<td class="num">{_samples(r["ch_samples"])} | {_samples(r["rj_samples"])}</td>'
        f'<td class="num">{_num(r["spread"], "{:g}")}</td><td class="small">{_signals(r["signals"])}</td></tr>'
        for r in rows)
    pages = max(1, -(-total // pq.size))
    nav = (f'<p id="paging">{total} pairs; page {pq.page} of {pages} '
           + (link("« previous", page=pq.page - 1) + " " if pq.page > 1 else "")
           + (link("next »", page=pq.page + 1) if pq.page < pages else "") + "</p>")
    errors = "".join(f"<p class='err'>{escape(e)}</p>" for e in pq.errors)
    return page(f"Run {run_id}, iteration {t}: pairs",
                _filters(pq, base) + errors + nav + f'<table id="pairs"><thead><tr>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table>" + nav,
                [(run_id, f"/run/{quote(run_id, safe='')}"), (f"iteration {t}", base)])


def _filters(pq: PairQuery, base: str) -> str:
    def box(name: str, label: str) -> str:
        value = getattr(pq, name)
        return (f'<label>{escape(label)} <input name="{name}" value="{escape("" if value is None else str(value))}">'
                "</label> ")
    options = "".join(f'<option value="{v}"{" selected" if pq.longer == v else ""}>{escape(t)}</option>'
                      for v, t in (("", "any"), ("chosen", "chosen longer"), ("rejected", "rejected longer"),
                                   ("equal", "equal")))
    sorts = "".join(f'<option value="{s}"{" selected" if pq.sort == s else ""}>{s}</option>'
                    for k in SORTS for s in (f"-{k}", k))
    return (f'<form class="filters" method="get" action="{base}">{box("q", "search")}{box("min_margin", "margin ≥")}'
            f'{box("max_margin", "margin ≤")}<label>length <select name="longer">{options}</select></label> '
            f'{box("min_spread", "judge spread ≥")}<label>sort <select name="sort">{sorts}</select></label> '
            f'{box("size", "per page")}<button type="submit">apply</button> <a href="{base}">reset</a></form>')


# --- one pair ----------------------------------------------------------------------------------------------------
def diff(a: str, b: str) -> tuple[str, str]:
    """Word-level differences of two texts as HTML: words only in `a` marked `del`, only in `b` marked `ins`."""
    ta, tb = re.split(r"(\s+)", a or ""), re.split(r"(\s+)", b or "")
    out_a, out_b = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ta, tb, autojunk=False).get_opcodes():
        x, y = escape("".join(ta[i1:i2])), escape("".join(tb[j1:j2]))
        if op == "equal":
            out_a.append(x), out_b.append(y)
        else:
            out_a.append(f'<mark class="del">{x}</mark>' if x else "")
            out_b.append(f'<mark class="ins">{y}</mark>' if y else "")
    return "".join(out_a), "".join(out_b)


def _versions(versions: dict) -> str:
    return ", ".join(f"{escape(k)} {_id(v)}" for k, v in sorted(versions.items())) or "-"


def _model(m: dict | None, fallback: str | None = None) -> str:
    if not m:
        return _id(fallback)
    return f"{escape(m['name'])} ({escape(m['kind'])}, iteration {m['iteration']}) {_id(m['model_id'])}"


def _judgments(c: dict) -> str:
    rows = []
    for j in c["judgments"]:
        verdict = (f"<span class='num'>{j['score']:g}</span>" if j["score"] is not None
                   else f"<span class='err'>parse failure: {escape(str(j['parse_error']))}</span>")
        rows.append([str(j["sample_index"]), verdict, f"<pre class='text'>{escape(j['raw_text'])}</pre>",
                     f"{_model(j['judge_model'], j['judge_model_id'])}<br><span class='small'>template "
                     f"{escape(j['template_name'] or '')} {_id(j['template_hash'])}</span>"])
    return table(["#", "score", "judge's text", "judge"], rows, 'class="judgments"') if rows \
        else "<p>No judge samples.</p>"


def _rewards(c: dict) -> str:
    rows = [[escape(r["signal"]), _num(r["value"], "{:.4g}") if r["value"] is not None
             else f"<span class='err'>error: {escape(str(r['error']))}</span>",
             f"<span class='small'>{escape(json.dumps(r['details'], default=str)) if r['details'] else ''}</span>"]
            for r in c["rewards"]]
    return table(["signal", "value", "details"], rows) if rows else ""


def _steps(c: dict) -> str:
    """The candidate's steps (process rewards) with their step scores; the step a step-wise pair forked at marked."""
    fork = (c.get("signals") or {}).get("step")
    rows = [[f"<b>{x['step_index']}</b> (fork)" if x["step_index"] == fork else str(x["step_index"]),
             ", ".join(f"{escape(k)} {_num(v)}" if v is not None else f"{escape(k)} <span class='err'>none</span>"
                       for k, v in sorted(x["scores"].items())) or "-",
             f"<pre class='text'>{escape(x['text'])}</pre>"
             + "".join(f"<span class='err small'>{escape(e)}</span>" for e in x["errors"][:1])]
            for x in c.get("steps") or []]
    return f"<h4>steps ({len(rows)})</h4>" + table(["#", "step rewards", "text"], rows, 'class="steps"') if rows else ""


def _origin(prompt: dict) -> str:
    if prompt["source"] == "seed":
        return f"seed <code>{escape(str(prompt['seed_id']))}</code>"
    if prompt["source"] == "file":
        return "from the prompts file (self_instruct.prompts_file)"
    shots = "".join(f"<li>{_id(s['prompt_id'])} {escape((s['text'] or '')[:200])}</li>" for s in prompt["few_shot"])
    return (f"self-instruct by {_model(prompt['model'], prompt['model_id'])} from {len(prompt['few_shot'])} "
            f"few-shot example(s):<ul>{shots}</ul>")


def pair_page(r: dict, labels: list[dict], message: str = "", message_class: str = "ok") -> str:
    pair, prompt, ch, rj = r["pair"], r["prompt"], r["chosen"], r["rejected"]
    a, b = diff(ch.get("text") or "", rj.get("text") or "")
    info = table(["", "value"], [
        ["pair", _id(pair["pair_id"])],
        ["run, iteration", f"{_id(pair['run_id'])}, {pair['iteration']}"],
        ["scores", f"chosen {_num(pair['chosen_score'])}, rejected {_num(pair['rejected_score'])}, margin "
                   f"<span id='margin'>{_num(pair['chosen_score'] - pair['rejected_score'], '{:.4f}')}</span>"],
        ["rule", escape(json.dumps(r["rule"], default=str)) if r["rule"] else "-"],
        ["prompt", f"{_id(prompt['prompt_id'])} ({escape(prompt['source'])})"],
        ["prompt origin", _origin(prompt)],
        ["prompt datasets", _versions(prompt["dataset_versions"])],
        ["in dataset versions", ", ".join(_id(v["version_id"]) for v in r["datasets"]) or "-"],
        ["trained into", ", ".join(_model(m) for m in r["trained"]) or "(no model trained on it yet)"],
        ["stage run", _id(pair["stage_run_id"])],
    ])
    sides = "".join(
        f"<div><h3>{role} {_id(c['candidate_id'])}</h3><p class='small'>score {_num(c['score'])}; "
        f"{c.get('num_tokens', '?')} tokens, {escape(str(c.get('finish_reason')))}; model "
        f"{_model(c.get('model'), c.get('model_id'))}; sample {c.get('sample_index')}, seed {c.get('seed')}; "
        f"datasets {_versions(c['dataset_versions'])}</p><pre class='text' id='{role}-text'>{text}</pre>"
        f"<h4>judge samples ({len(c['judgments'])})</h4>{_judgments(c)}{_rewards(c)}{_steps(c)}"
        f"<p class='small'>signals: {escape(json.dumps(c['signals'], default=str))}</p></div>"
        for role, c, text in (("chosen", ch, a), ("rejected", rj, b)))
    note = f'<p class="{message_class}" id="message">{escape(message)}</p>' if message else ""
    body = (f"{note}<h2>Prompt</h2><pre class='text' id='prompt-text'>{escape(prompt['text'])}</pre>"
            f"{_label_form(pair['pair_id'])}{_labels(labels)}<h2>Chosen vs rejected</h2>"
            f"<p class='small'>words only in the chosen text <mark class='del'>like this</mark>, only in the "
            f"rejected <mark class='ins'>like this</mark></p><div class='side'>{sides}</div><h2>Lineage</h2>{info}")
    run = pair["run_id"]
    return page(f"Pair {pair['pair_id']}", body, [
        (run, f"/run/{quote(run, safe='')}"), (f"iteration {pair['iteration']}",
                                              f"/run/{quote(run, safe='')}/{pair['iteration']}")])


def _label_form(pair_id: str) -> str:
    buttons = "".join(f'<button type="submit" name="label" value="{v}">{v}</button> ' for v in LABELS)
    return (f'<form id="label-form" method="post" action="/pair/{quote(pair_id, safe="")}/label">'
            '<b>Review:</b> does the chosen text deserve to win? <input name="note" placeholder="note" size="40"> '
            '<input name="who" id="who" placeholder="your name (default: OS user)" size="24"> '
            f"{buttons}</form><script>var w=document.getElementById('who');"
            "w.value=localStorage.getItem('flywheel-who')||'';"
            "document.getElementById('label-form').addEventListener('submit',function(){"
            "localStorage.setItem('flywheel-who',w.value)});</script>")


def _labels(labels: list[dict]) -> str:
    if not labels:
        return "<p class='small' id='labels'>No labels yet.</p>"
    rows = [[f"<span class='label'>{escape(x['label'])}</span>", escape(x["note"] or ""), escape(x["who"]),
             escape(str(x["created_at"])[:19])] for x in labels]
    return table(["label", "note", "who", "when"], rows, 'id="labels"')


# --- any id ------------------------------------------------------------------------------------------------------
ID_KEY = re.compile(r"(_id|_hash|^derived_from|^dataset_version|^few_shot_ids|^parent_id|^runs)$")


def tree(value: Any, key: str = "") -> str:
    """A JSON value as nested lists; strings under id-like keys become links to their own page."""
    if isinstance(value, dict):
        return "<ul class='tree'>" + "".join(f"<li><b>{escape(str(k))}</b>: {tree(v, str(k))}</li>"
                                             for k, v in value.items()) + "</ul>"
    if isinstance(value, list):
        if not value:
            return "[]"
        return "<ul class='tree'>" + "".join(f"<li>{tree(v, key)}</li>" for v in value) + "</ul>"
    if isinstance(value, str) and ID_KEY.search(key) and not key.endswith("config_hash"):
        return _id(value)
    text = escape(str(value)) if value is not None else "null"
    return f"<pre class='text'>{text}</pre>" if isinstance(value, str) and "\n" in value else text


def lineage_page(ident: str, result: dict) -> str:
    """`flywheel lineage ID` as a tree, with its JSON below."""
    link = f"<p><a href='/pair/{quote(ident, safe='')}'>open the pair view</a></p>" if result["kind"] == "pair" else ""
    raw = escape(json.dumps(result, default=str, ensure_ascii=False, indent=2))
    return page(f"Lineage of {result['kind']} {ident}", f"{link}<div id='lineage'>{tree(result)}</div>"
                f"<details><summary>JSON</summary><pre class='text'>{raw}</pre></details>")


def row_page(ident: str, table_name: str, row: dict, pairs: list[str]) -> str:
    used = ("<h2>Pairs using it</h2><ul>" + "".join(f"<li><a href='/pair/{quote(p, safe='')}'>{escape(p)}</a></li>"
                                                    for p in pairs) + "</ul>") if pairs else ""
    shown = {k: (json.loads(v) if isinstance(v, str) and k in ("sampling", "stats", "config", "details") else v)
             for k, v in row.items()}
    return page(f"{table_name[:-1] if table_name.endswith('s') else table_name} {ident}",
                f"<div id='lineage'>{tree(shown)}</div>{used}")
