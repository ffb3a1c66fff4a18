"""Self-instruct: M_t writes new prompts from few-shot examples; near-duplicates and non-tasks are dropped.

Two modes (`self_instruct.mode`, see `resolved_mode`): 'completion' continues a raw few-shot list of `Task: ...` lines
(`prompts/self_instruct.txt`, chat=False), for base models such as the tiny scratch model; 'chat' sends the examples
as a numbered list in one user turn asking for one new task (`prompts/self_instruct_chat.txt`, chat=True), for
instruct models. Completion mode reads the model's first line, as it always did. Chat mode reads its lines in turn and
takes the first that passes every filter (`pick_prompt`: a small instruct model often lists copies of the examples
before a new one), each line cleaned first (`clean_prompt`: leading labels such as `Task:`, `Question:`, `D:`, `1.`,
`**Task:**` and surrounding quotes stripped, cut at an inline ` A:`/` Answer:`), and drops non-tasks (`not_a_task`).

Few-shot (paper: 8-shot, 6 seed + 2 generated): each attempt shows `seed_shots` seed prompts and `few_shot -
seed_shots` prompts generated and kept earlier in the run (earlier iterations and earlier batches of this stage), or
more seeds while there are not enough generated ones. Each prompt records the ids of the examples that produced it.

Every attempt is stored, kept or not; a dropped one records why: `empty`, `too_short`, `too_long`,
`not_instruction` (starts with punctuation or a non-letter, or is mostly not words), `not_a_task` (chat mode: ends with ':',
opens like an answer or an assistant: 'The answer is', 'Sure', 'Here is', ...; or is a statement: no '?' and no
request word first; see `not_a_task`), `echo` (chat mode: repeats the template's own instruction),
`banned_keyword` (asks for something a text model cannot see or make: images,
files, ...), `duplicate`, or `near_duplicate` (ROUGE-L F >= `dedup_threshold` against a prompt kept so far: seeds,
earlier iterations, earlier attempts; see `dedup.py`).
Attempts are made in fixed batches in order, each batch with its own seed, so a resumed stage continues exactly where
a killed one stopped.

With `self_instruct.prompts_file` set, the prompts come from that file instead (`prompts_from_file`): a pool of
unlabeled prompts, as Meta-Rewarding and SPPO use, or a task's generator (`flywheel/analysis/miniworld.py`). A prompt
repeated in the file counts once (`distinct_prompts`, with a warning); the run's preflight (`check_self_instruct`)
refuses a file whose distinct prompts, less those the seeds already hold, are fewer than `num_prompts` x the
iterations that draw from it.
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

from ..backends import SamplingParams
from ..config import ConfigError, FlywheelConfig, SelfInstructConfig, check_template, content_hash
from ..registry import Registry, now
from ..stage import StageResult, backend_for, batch_seed, load_template, pending_batches, read_template, run_stage
from .dedup import NearDuplicateIndex, rouge_l  # noqa: F401  (rouge_l: re-exported for callers and tests)

log = logging.getLogger("flywheel")
_WORD = re.compile(r"[a-z0-9]+")
TEMPLATE_FIELDS = ("examples",)  # what `self_instruct` fills into `template` / `chat_template` (format_examples)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _banned(text: str, keywords: list[str]) -> bool:
    low = text.lower()
    return any(re.search(rf"\b{re.escape(k.lower())}\b", low) for k in keywords)


def _not_instruction(text: str) -> bool:
    if not text[0].isalpha() or not text[0].isascii():
        return True
    letters = sum(ch.isalpha() or ch.isspace() for ch in text)
    return letters < 0.6 * len(text)


# Leading labels stripped by clean_prompt, repeatedly: "Task:", "New task:", "Task 3:", "Question:", "Q:", "User:",
# "**Task:**", list markers "1.", "2)", "-", "*", "•".
_LABEL = re.compile(r"^(?:[*_]{2}\s*)?(?:new\s+)?(?:task|question|instructions?|prompt|user|[a-z])(?:\s*#?\d+)?\s*"
                    r"(?:[*_]{2}\s*)?:(?:\s*[*_]{2})?\s*", re.I)
_MARKER = re.compile(r"^(?:\d{1,2}\s*[.)]|[-*•])(?:\s+|$)")
_ANSWER = re.compile(r"\s(?:A|[Aa]nswer|ANSWER|[Rr]esponse)\s*:")  # an answer written on the task's line
_QUOTED = re.compile(r'"[^"]*"|“[^”]*”')  # a quotation inside the text: its '?' asks nothing of the reader
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "`": "`", "**": "**"}

# not_a_task: an answer or assistant preamble at the start (compared lowercased, as whole words) ...
NOT_TASK_PREFIXES = ("the answer", "answer:", "response:", "sure", "here is", "here's", "here are", "certainly",
                     "i'm", "i am", "as an ai", "of course", "great", "okay")
# ... else a request needs a '?' (not one inside a quotation), one of these openers, or one of these words first (the verbs also count first after
# a comma: "In one sentence, explain ..."). Imperatives and request words, not a dictionary: add one when a real task
# is lost.
REQUEST_OPENERS = ("i need", "i want", "i'd like", "i would like")
REQUEST_VERBS = frozenset(
    "add analyse analyze answer arrange brainstorm build calculate categorise categorize change check choose classify "
    "compare complete compose compute convert correct count create critique define describe design determine develop "
    "discuss divide draft draw edit estimate evaluate expand explain express find fix generate give help identify "
    "imagine interpret let list make match multiply name outline paraphrase pick plan predict pretend propose "
    "proofread provide rank rate recommend remove rephrase replace rewrite reword say select show shorten simplify "
    "solve sort spell state subtract suggest summarise summarize teach tell translate turn use write please".split())
QUESTION_WORDS = frozenset(
    "what why how when where which who whom whose is are was were can could would should do does did will may might "
    "shall".split())


def clean_prompt(text: str) -> str:
    """The new prompt in a model's output: its first non-empty line, with leading labels, list markers and
    surrounding quotes or bold stripped (repeatedly), cut before an inline answer (" A: ...", " Answer: ...")."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    while True:
        before = line
        line = _LABEL.sub("", line, count=1)
        line = _MARKER.sub("", line, count=1).strip()
        for open_, close in _QUOTES.items():
            if len(line) > 2 * len(open_) and line.startswith(open_) and line.endswith(close):
                line = line[len(open_):-len(close)].strip()
        if line == before:
            break
    cut = _ANSWER.search(line)
    return line[: cut.start()].strip() if cut else line


ECHO_THRESHOLD = 0.5  # ROUGE-L F against a sentence of the chat template at or above which a prompt echoes it


def template_sentences(template: str) -> list[list[str]]:
    """The words of each sentence of a self-instruct template, the few-shot block left out: what an echo repeats."""
    text = template.replace("{examples}", "\n")
    return [w for part in re.split(r"[.!?\n]+", text) if len(w := words(part)) >= 3]


def pick_prompt(output: str, kept: "KeptPrompts", cfg: SelfInstructConfig, echo: NearDuplicateIndex | None,
                scan: bool) -> tuple[str, str | None]:
    """(prompt, drop reason or None) from one attempt's output.

    Completion mode (`scan` False, base models) takes the first line as it is and applies the filters without
    `not_a_task`, exactly as before chat mode existed. Chat mode (`scan`, instruct models) reads the lines in turn,
    each cleaned by `clean_prompt`, and takes the first that passes every filter, since a small instruct model
    often lists copies of the examples before a new one; when none passes, the first line and its reason. With
    `echo` (the chat template's sentences), a prompt that repeats the instruction itself is dropped as `echo`."""
    if not scan:
        text = output.split("\n")[0].strip()
        return text, kept.reason(text, cfg, tasks_only=False)
    first = None
    for line in [ln for ln in output.splitlines() if ln.strip()] or [""]:
        text = clean_prompt(line)
        reason = kept.reason(text, cfg)
        if reason is None and echo is not None and echo.best(words(text))[0] >= ECHO_THRESHOLD:
            reason = "echo"
        if reason is None:
            return text, None
        first = first or (text, reason)
    return first


def _first_word(text: str) -> str:
    m = re.match(r"[a-z]+", text.strip().lower())
    return m.group(0) if m else ""


def not_a_task(text: str) -> bool:
    """True for text that asks nothing: it ends with ':', opens like an answer or an assistant ('Sure', 'Here is',
    'The answer is', 'I am'), or is a statement (no '?' and no request word first, see REQUEST_VERBS)."""
    text = text.strip()
    low = text.lower().replace("’", "'")

    def opens(prefixes: tuple[str, ...]) -> bool:
        return any(low.startswith(p) and not low[len(p):len(p) + 1].isalnum() for p in prefixes)

    if text.endswith(":") or opens(NOT_TASK_PREFIXES):
        return True
    unquoted = _QUOTED.sub("", text)
    if "?" in unquoted or opens(REQUEST_OPENERS) or _first_word(low) in REQUEST_VERBS | QUESTION_WORDS:
        return False
    return not any(_first_word(part) in REQUEST_VERBS for part in re.split(r"[,;:]", low)[1:])


def filter_reason(text: str, index: NearDuplicateIndex, exact: set[tuple[str, ...]], cfg: SelfInstructConfig,
                  tasks_only: bool = True) -> str | None:
    """Why a generated prompt is dropped, or None to keep it. `index` and `exact` hold the prompts kept so far.
    `tasks_only=False` (completion mode) skips the `not_a_task` check, as before chat mode existed."""
    if not text.strip():
        return "empty"
    n = len(text.split())
    if n < cfg.min_words:
        return "too_short"
    if n > cfg.max_words:
        return "too_long"
    if _not_instruction(text):
        return "not_instruction"
    if tasks_only and not_a_task(text):
        return "not_a_task"
    if _banned(text, cfg.banned_keywords):
        return "banned_keyword"
    w = words(text)
    if tuple(w) in exact:
        return "duplicate"
    if index.best(w)[0] >= cfg.dedup_threshold:
        return "near_duplicate"
    return None


class KeptPrompts:
    """The prompts kept so far, for the duplicate checks."""

    def __init__(self, threshold: float, texts: list[str] = ()):
        self.index = NearDuplicateIndex(threshold)
        self.exact: set[tuple[str, ...]] = set()
        for t in texts:
            self.add(t)

    def add(self, text: str) -> None:
        w = words(text)
        self.index.add(w)
        self.exact.add(tuple(w))

    def reason(self, text: str, cfg: SelfInstructConfig, tasks_only: bool = True) -> str | None:
        return filter_reason(text, self.index, self.exact, cfg, tasks_only)


def few_shot(seeds: list[dict], generated: list[dict], cfg: SelfInstructConfig, key: list) -> list[dict]:
    """`cfg.seed_shots` seed prompts and the rest generated ones (seeds again while too few are generated)."""
    rng = random.Random(content_hash(key))
    k_gen = min(cfg.few_shot - min(cfg.seed_shots, cfg.few_shot), len(generated))
    k_seed = min(cfg.few_shot - k_gen, len(seeds))
    shots = rng.sample(seeds, k_seed) + rng.sample(generated, k_gen)
    rng.shuffle(shots)
    return shots


def read_prompts_file(path) -> list[dict]:
    """The rows of `self_instruct.prompts_file`: {'prompt', 'reference' (optional)} per JSON line, in file order."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"self_instruct.prompts_file: file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"self_instruct.prompts_file: {path}:{n} is not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise ValueError(f"self_instruct.prompts_file: {path}:{n} needs a non-empty string 'prompt'")
        ref = obj.get("reference")
        rows.append({"prompt": obj["prompt"].strip(), "reference": None if ref is None else str(ref)})
    if not rows:
        raise ValueError(f"self_instruct.prompts_file: {path} holds no prompts")
    return rows


def distinct_prompts(rows: list[dict], path) -> list[dict]:
    """`rows` with each prompt once (its first row), logging a warning that counts the repeats and shows one. A
    prompt given two different references is refused: which answer a rule reward checks would be a guess."""
    first: dict[str, dict] = {}
    repeated: list[str] = []
    for r in rows:
        kept = first.setdefault(r["prompt"], r)
        if kept is not r:
            repeated.append(r["prompt"])
            if kept["reference"] != r["reference"]:
                raise ValueError(f"self_instruct.prompts_file: {path}: the prompt {r['prompt'][:80]!r} is given two "
                                 f"references ({kept['reference']!r} and {r['reference']!r}); keep one")
    if repeated:
        log.warning("self_instruct.prompts_file: %s: %d repeated prompt(s) counted once (%d distinct of %d), e.g. %r",
                    path, len(repeated), len(first), len(rows), repeated[0][:80])
    return list(first.values())


def check_self_instruct(cfg: FlywheelConfig, seed_prompts: set[str], rounds: int) -> None:
    """Before a run whose `rounds` iterations run self-instruct: the template the stage fills must hold exactly
    {examples}; a prompts file must hold enough distinct prompts the seeds do not (`seed_prompts`) for
    `num_prompts` per round, since each is used once per run. Reads files, loads no model."""
    c = cfg.self_instruct
    if not rounds:
        return
    if c.prompts_file is None:
        setting = "self_instruct.chat_template" if resolved_mode(cfg) == "chat" else "self_instruct.template"
        path = c.chat_template if resolved_mode(cfg) == "chat" else c.template
        check_template(read_template(path, setting), setting, path, TEMPLATE_FIELDS)
        return
    pool = distinct_prompts(read_prompts_file(c.prompts_file), c.prompts_file)
    available = sum(r["prompt"] not in seed_prompts for r in pool)
    need = c.num_prompts * rounds
    if available < need:
        raise ConfigError(f"self_instruct.prompts_file: {c.prompts_file} has {available} distinct prompts the seeds "
                          f"do not hold, and the run needs {need} (self_instruct.num_prompts={c.num_prompts} x "
                          f"{rounds} iteration(s), none used twice): add prompts, or lower self_instruct.num_prompts "
                          "or run.iterations")


def prompts_from_file(cfg: FlywheelConfig, run_id: str, iteration: int, seeds_sid: str,
                      earlier_sids: list[str]) -> StageResult:
    """The iteration's prompts drawn from a file instead of written by the model: `num_prompts` of them, at random
    (seeded), none that a seed or an earlier iteration of the run already used. References come along, for rule
    rewards. Same stage name and rows as self-instruct, with source 'file'."""
    c = cfg.self_instruct
    pool = read_prompts_file(c.prompts_file)
    inputs = {"prompts_file": content_hash(pool), "num_prompts": c.num_prompts, "seeds": seeds_sid,
              "earlier": sorted(earlier_sids), "seed": cfg.run.seed}

    def work(reg: Registry, sid: str) -> dict:
        used = {r["text"] for r in reg.rows("SELECT text FROM prompts WHERE stage_run_id IN (SELECT unnest(?))",
                                             [[seeds_sid, *earlier_sids]])}
        fresh = [r for r in distinct_prompts(pool, c.prompts_file) if r["prompt"] not in used]
        picked = random.Random(content_hash([sid, cfg.run.seed])).sample(fresh, min(c.num_prompts, len(fresh)))
        reg.insert("prompts", [dict(prompt_id=f"p-{content_hash([sid, i])}", run_id=run_id, iteration=iteration,
                                    source="file", text=r["prompt"], reference=r["reference"], seed_id=None,
                                    few_shot_ids=None, kept=True, drop_reason=None, model_id=None, stage_run_id=sid,
                                    config_hash=cfg.config_hash(), created_at=now()) for i, r in enumerate(picked)])
        return {"attempted": len(picked), "kept": len(picked), "dropped": {}, "source": str(c.prompts_file),
                "unused_before": len(fresh)}

    return run_stage(cfg, "self_instruct", run_id, iteration, None, inputs, work)


def resolved_mode(cfg: FlywheelConfig) -> str:
    """'chat' or 'completion': `self_instruct.mode`, where 'auto' is completion for the tiny scratch model (a base
    model with no chat training) and chat for any other base (an instruct model)."""
    mode = cfg.self_instruct.mode
    if mode == "auto":
        return "completion" if cfg.scratch else "chat"
    return mode


def format_examples(shots: list[dict], mode: str) -> str:
    """The few-shot block for the template: `Task: ...` lines to continue, or a numbered list for a chat turn."""
    if mode == "chat":
        return "\n".join(f"{j}. {' '.join(e['text'].split())}" for j, e in enumerate(shots, 1))
    return "\n".join(f"Task: {e['text']}" for e in shots)


def self_instruct(cfg: FlywheelConfig, run_id: str, iteration: int, model_id: str, seeds_sid: str,
                  earlier_sids: list[str]) -> StageResult:
    c = cfg.self_instruct
    if c.prompts_file is not None:
        return prompts_from_file(cfg, run_id, iteration, seeds_sid, earlier_sids)
    mode = resolved_mode(cfg)
    with Registry(cfg.registry.root) as reg:
        if mode == "chat":
            template, template_hash = load_template(reg, c.chat_template, "self_instruct_chat")
        else:
            template, template_hash = load_template(reg, c.template, "self_instruct")
    # the key holds the effective mode, not `mode`/`chat_template` as written: a completion stage keeps the key (and
    # so the prompt ids) it had before chat mode existed, and 'auto' and 'completion' share it for the tiny model
    inputs = {"model": model_id, "seeds": seeds_sid, "earlier": sorted(earlier_sids),
              "cfg": c.model_dump(mode="json", exclude={"mode", "chat_template"}), "template": template_hash,
              "seed": cfg.run.seed}
    if mode == "chat":
        inputs["mode"] = "chat"

    def work(reg: Registry, sid: str) -> dict:
        seeds = reg.rows("SELECT prompt_id, text FROM prompts WHERE stage_run_id = ? ORDER BY prompt_id", [seeds_sid])
        # generated prompts kept so far: earlier iterations, and batches of this stage committed before a crash
        generated = reg.rows("SELECT prompt_id, text FROM prompts WHERE kept AND stage_run_id IN (SELECT unnest(?)) "
                             "ORDER BY prompt_id", [[*earlier_sids, sid]])
        kept = KeptPrompts(c.dedup_threshold, [r["text"] for r in seeds + generated])
        echo = None
        if mode == "chat":
            echo = NearDuplicateIndex(ECHO_THRESHOLD)
            for sentence in template_sentences(template):
                echo.add(sentence)
        params = SamplingParams(n=1, temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens)

        def ids_of(attempts: list) -> list[str]:
            return [f"p-{content_hash([sid, i])}" for i in attempts]

        all_attempts = list(range(c.num_prompts))
        for b, attempts, ids in pending_batches(reg, "self_instruct", "prompts", "prompt_id", all_attempts,
                                                c.batch_size, ids_of, f"self-instruct (iteration {iteration})"):
            pool = sorted(generated, key=lambda r: r["prompt_id"])  # the same order after a resume
            shots = [few_shot(seeds, pool, c, [sid, i, "shots"]) for i in attempts]
            texts = [template.format(examples=format_examples(s, mode)) for s in shots]  # TEMPLATE_FIELDS
            outs = backend_for(cfg, reg, model_id).generate(texts, params, seed=batch_seed(sid, b, cfg.run.seed),
                                                            chat=mode == "chat")
            rows = []
            for pid, shot, out in zip(ids, shots, outs):
                text, reason = pick_prompt(out[0].text, kept, c, echo, scan=mode == "chat")
                if reason is None:
                    kept.add(text)
                    generated.append({"prompt_id": pid, "text": text})
                rows.append(dict(prompt_id=pid, run_id=run_id, iteration=iteration, source="self_instruct",
                                 text=text, reference=None, seed_id=None, few_shot_ids=[e["prompt_id"] for e in shot],
                                 kept=reason is None, drop_reason=reason, model_id=model_id, stage_run_id=sid,
                                 config_hash=cfg.config_hash(), created_at=now()))
            reg.insert("prompts", rows)
        counts = reg.rows("SELECT coalesce(drop_reason, 'kept') AS k, count(*) AS n FROM prompts WHERE stage_run_id = ? "
                          "GROUP BY ALL ORDER BY k", [sid])
        by = {r["k"]: r["n"] for r in counts}
        return {"attempted": sum(by.values()), "kept": by.pop("kept", 0), "dropped": by}

    return run_stage(cfg, "self_instruct", run_id, iteration, model_id, inputs, work)
