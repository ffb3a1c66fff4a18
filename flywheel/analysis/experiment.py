"""`flywheel experiment NAME`: does the flywheel improve a model where the truth is known?

    exp = load_experiment("configs/experiments/sort.yaml", ["seeds=[0]"])
    rows = run_experiment(exp, registry_root)      # one row per (seed, variant, model)

The world is the experiment's `task` (flywheel/analysis/tasks.py): `sort`, digit lists sorted by a tiny model
trained from scratch (flywheel/analysis/miniworld.py), `arith`, multi-step sums worked one operation per line by
such a model (flywheel/analysis/arithworld.py), or `ifworld`, IFEval's verifiable instructions followed by a real
chat model (flywheel/analysis/ifworld.py). For each seed: write the world's files (seeds, prompt pool, held-out
test; pretraining text for sort and arith), then run the flywheel once per variant (the experiment's `config` with the
variant's overrides; `flywheel.pipeline.run`, what `flywheel run` runs inside its Prefect flow, all in one registry,
so PT and M1 are built once per seed and shared), then score every model of every run on the held-out test set:

- `accuracy`: the task's held-out figure of greedy answers (sort: exact match; arith: exact match of the final
  value, with `step_accuracy`, the share of operations done right before the first wrong line, beside it; ifworld:
  IFEval prompt-level strict accuracy, with `instruction_accuracy` and `prompt_loose` beside it), over the whole
  test set;
- `judge_agreement`: the model as judge (the run's judge mode, template and sampling) on `eval.judge_problems` test
  problems, each with a right answer and a wrong one (`task.judge_items`): the share where the right one scores
  higher (ties count half, so 0.5 is chance); `judge_unscored` counts answers with no valid verdict in any sample;
- `pairs`, `pair_accuracy`: the pairs the model was trained on (M2 on iteration 1's, ...) and the share of them whose
  chosen answer is better than the rejected one by ground truth: what the reward signal gave the trainer;
- `mean_tokens`: the mean length of its greedy answers;
- `sampled_accuracy`, `own_score_right` / `own_score_wrong`: in the iteration the model ran as M_t, the share of its
  sampled candidates that were right, and the mean score it gave, as judge, to its right and its wrong candidates.

Scores are cached under `<registry>/experiments/<name>/eval/`, named by the model id (a content hash) and a hash of
the test set and the scoring settings, so an interrupted experiment resumes where it stopped. Results:
`results.json`, `results.md` (mean and spread over seeds), `curves.png`.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, PrivateAttr, ValidationError, model_validator

from ..config import ConfigError, FlywheelConfig, _format_errors, _Section, apply_override, content_hash
from .tasks import TASKS, SortTask


class EvalConfig(_Section):
    judge_problems: int = Field(100, ge=0, description="Test problems the judge agreement is measured on.")
    max_new_tokens: int = Field(24, ge=1, description="Greedy answer length limit on the test set.")
    batch_size: int = Field(64, ge=1)


class ExperimentConfig(_Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    task: str = Field("sort", description=f"The world (flywheel/analysis/tasks.py): one of {sorted(TASKS)}.")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="Run seeds; each makes its own world and models.")
    world: dict[str, Any] = Field(default_factory=dict, description="The world's sizes: the task's `sizes_model()`.")
    eval: EvalConfig = EvalConfig()
    config: dict[str, Any] = Field(default_factory=dict, description="The flywheel config every variant starts from.")
    variants: dict[str, dict[str, Any]] = Field(..., min_length=1,
                                                 description="Variant name -> overrides of `config` (nested keys).")
    _task: Any = PrivateAttr(None)

    @model_validator(mode="after")
    def _the_task_and_its_world(self) -> "ExperimentConfig":
        if self.task not in TASKS:
            raise ValueError(f"task: unknown task {self.task!r}; built in: {sorted(TASKS)}")
        kind = TASKS[self.task]
        try:
            self._task = kind(kind.sizes_model().model_validate(self.world))
        except ValidationError as e:
            raise ValueError("world." + _format_errors(e).removeprefix("invalid config:\n").strip()) from None
        return self

    @property
    def sizes(self):
        """The validated `world:` section (the task's sizes model)."""
        return self._task.world_sizes

    @property
    def the_task(self):
        return self._task


def load_experiment(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    try:
        exp = ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: {_format_errors(e)}") from None
    for name in exp.variants:  # every variant must make a valid flywheel config, before anything runs
        variant_config(exp, name, 0, Path("data_registry"), {})
    return exp


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def variant_config(exp: ExperimentConfig, variant: str, seed: int, root: Path, files: dict[str, Path]) -> FlywheelConfig:
    """The flywheel config of one variant on one seed's world."""
    fixed = {"run": {"name": f"{exp.name}-{variant}", "seed": seed}, "registry": {"root": str(root)},
             "seeds": {"path": str(files.get("seeds", "seeds.jsonl")), "format": "oasst"},
             "self_instruct": {"prompts_file": str(files.get("pool", "pool.jsonl"))}}
    fixed = _merge(exp.the_task.fixed_config(files), fixed)
    data = _merge(_merge(exp.config, exp.variants[variant]), fixed)
    try:
        return FlywheelConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"experiment {exp.name}, variant {variant}: {_format_errors(e)}") from None


# --- scoring one model ------------------------------------------------------------------------------------------------
def score_model(cfg: FlywheelConfig, model_path: str, test: list[dict], ev: EvalConfig, seed: int,
                task=None, judge_items: list[tuple] | None = None) -> dict:
    """The task's held-out figures of greedy answers on `test` and their mean length, and the judge's agreement on
    `judge_items` ((prompt, right answer, wrong answer, reference), from `task.judge_items`)."""
    from ..backends import SamplingParams, make_backend
    from ..backends.models import resolve_device
    from ..stages.judge import read_judge_template, verdicts

    task = task or SortTask(None)
    backend = make_backend(cfg.generate, model_path, resolve_device(cfg.run.device), ray=cfg.ray)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=ev.max_new_tokens)
    answers = []
    for i in range(0, len(test), ev.batch_size):
        batch = test[i:i + ev.batch_size]
        answers += [g[0] for g in backend.generate([r["prompt"] for r in batch], greedy, seed=seed, chat=True)]
    graded = task.grade(test, [a.text for a in answers])
    correct = graded.pop("correct")

    template = read_judge_template(cfg.judge)  # judge.template, or judge.verify_template in verify mode
    # (prompt, its right answer), (prompt, a wrong one), for each judged problem
    items = [(x, y, ref) for x, right, wrong, ref in (judge_items or []) for y in (right, wrong)]
    j = cfg.judge
    scores = [v.score for i in range(0, len(items), j.batch_size)
              for v in verdicts(backend, template, _judge_args(cfg, items[i:i + j.batch_size]), j, seed + i)]
    wins = []
    for right, wrong in zip(scores[0::2], scores[1::2]):
        if right is None or wrong is None:
            wins.append(0.5)  # no verdict to rank by: chance
        else:
            wins.append(1.0 if right > wrong else 0.5 if right == wrong else 0.0)
    return {**graded, "test_problems": len(test),
            "mean_tokens": sum(a.num_tokens for a in answers) / len(answers),
            "judge_agreement": sum(wins) / len(wins) if wins else None, "judge_problems": len(wins),
            "judge_unscored": sum(s is None for s in scores),
            "examples": [{"prompt": r["prompt"], "answer": a.text, "correct": c}
                         for r, a, c in list(zip(test, answers, correct))[:5]]}


def _judge_args(cfg: FlywheelConfig, items: list[tuple]) -> list[tuple]:
    """(prompt, response, reference) where the judge mode reads references (verify), else (prompt, response)."""
    return items if cfg.judge.mode == "verify" else [(x, y) for x, y, _ in items]


def _stage_of(reg, run_id: str, iteration: int, stage: str) -> str | None:
    """The stage run a run used (rows of a stage shared with an earlier run carry that run's id, not this one's)."""
    return reg.scalar("SELECT stage_run_id FROM run_stages WHERE run_id = ? AND iteration = ? AND stage = ?",
                      [run_id, iteration, stage])


def pair_quality(reg, run_id: str, iteration: int, task=None) -> dict:
    """How many pairs iteration `iteration` of the run trained on, how many were right by ground truth (the chosen
    answer's value above the rejected one's: for sort, right over wrong), and the share whose chosen one is right."""
    task = task or SortTask(None)
    rows = reg.rows(
        "SELECT p.text AS prompt, ch.text AS chosen, rj.text AS rejected, p.reference FROM pairs pr "
        "JOIN prompts p ON p.prompt_id = pr.prompt_id JOIN candidates ch ON ch.candidate_id = pr.chosen_id "
        "JOIN candidates rj ON rj.candidate_id = pr.rejected_id WHERE pr.stage_run_id = ?",
        [_stage_of(reg, run_id, iteration, "pairs")])
    if not rows:
        return {"pairs": 0, "pair_accuracy": None, "pair_inverted": None, "chosen_correct": None}
    vals = [(task.value(r["prompt"], r["chosen"], r["reference"]), task.value(r["prompt"], r["rejected"], r["reference"]))
            for r in rows]
    return {"pairs": len(rows), "pair_accuracy": sum(c > w for c, w in vals) / len(vals),
            "pair_inverted": sum(c < w for c, w in vals) / len(vals),  # the wrong way round (the rest: a tie)
            "chosen_correct": sum(c == 1.0 for c, _ in vals) / len(vals)}


NO_PAIRS = {"pairs": None, "pair_accuracy": None, "pair_inverted": None, "chosen_correct": None}


def trains_on_pairs(cfg: FlywheelConfig, iteration: int) -> bool:
    """Whether iteration `iteration`'s trainer trains on the pairs stage's pairs. GRPO, RLOO, PPO and plain SFT do
    not (a pairs stage may still run for the report): their models were trained on 0 pairs."""
    from ..training import TRAINERS

    return "pairs" in TRAINERS[cfg.train.trainer_for(iteration)].consumes


def own_judgments(reg, run_id: str, iteration: int, task=None) -> dict:
    """The judge's mean score (as M_t, in the loop) of iteration `iteration`'s right and wrong candidates: a judge
    that helps gives the right ones more."""
    sid = _stage_of(reg, run_id, iteration, "judge")
    rows = reg.rows(
        "SELECT any_value(p.text) AS prompt, any_value(c.text) AS text, any_value(p.reference) AS reference, "
        "avg(j.score) AS score "
        "FROM judgments j JOIN candidates c USING (candidate_id) JOIN prompts p USING (prompt_id) "
        "WHERE j.stage_run_id = ? AND j.score IS NOT NULL AND p.reference IS NOT NULL GROUP BY j.candidate_id",
        [sid]) if sid else []
    task = task or SortTask(None)
    right_ = [task.value(r["prompt"], r["text"], r["reference"]) == 1.0 for r in rows]
    right = [r["score"] for r, ok in zip(rows, right_) if ok]
    wrong = [r["score"] for r, ok in zip(rows, right_) if not ok]
    return {"own_score_right": statistics.fmean(right) if right else None,
            "own_score_wrong": statistics.fmean(wrong) if wrong else None}


def candidate_accuracy(reg, run_id: str, iteration: int, task=None) -> float | None:
    """The share of the iteration's sampled candidates (of M_t, the model the iteration started from) that are
    right: how often M_t gets it when sampling."""
    task = task or SortTask(None)
    its = reg.rows("SELECT model_in FROM iterations WHERE run_id = ? AND iteration = ?", [run_id, iteration])
    model = its[0]["model_in"] if its else None  # (an anchored stage also holds M1's candidates: not M_t's)
    rows = reg.rows("SELECT p.text AS prompt, c.text, p.reference FROM candidates c JOIN prompts p USING (prompt_id) "
                    "WHERE c.stage_run_id = ? AND p.reference IS NOT NULL AND (?::VARCHAR IS NULL OR c.model_id = ?)",
                    [_stage_of(reg, run_id, iteration, "generate"), model, model])
    return sum(task.value(r["prompt"], r["text"], r["reference"]) == 1.0 for r in rows) / len(rows) if rows else None


# --- the experiment ---------------------------------------------------------------------------------------------------
def judge_key(cfg: FlywheelConfig) -> dict:
    """The judge settings a model's scores depend on: verify mode's fields only in verify mode, so scores cached
    before that mode existed stay valid (as the judge stage's ids do: `judge.judge_inputs`)."""
    from ..stages.judge import VERIFY_ONLY

    c = cfg.judge
    return c.model_dump(mode="json", exclude=None if c.mode == "verify" else VERIFY_ONLY)


def exp_dir(root: Path, exp: ExperimentConfig) -> Path:
    return Path(root) / "experiments" / exp.name


def model_chain(reg, run_id: str) -> list[dict]:
    """M1, M2, ... of a run, from its iterations (M1 is the first iteration's input)."""
    its = reg.rows("SELECT iteration, model_in, model_out FROM iterations WHERE run_id = ? ORDER BY iteration", [run_id])
    ids = [its[0]["model_in"]] + [i["model_out"] for i in its if i["model_out"]] if its else []
    return [reg.model(m) for m in ids]


def run_experiment(exp: ExperimentConfig, root: Path, variants: list[str] | None = None, console=None) -> list[dict]:
    """Run every (seed, variant) and score every model; returns the result rows (also written to results.json)."""
    from ..pipeline import run
    from ..registry import Registry
    from ..registry.integrity import model_path
    from ..registry.runs import run_id_for
    from ..training import NoTrainingDataError

    out = exp_dir(root, exp)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    names = variants or list(exp.variants)
    unknown = sorted(set(names) - set(exp.variants))
    if unknown:
        raise ConfigError(f"--variants: unknown variant(s) {unknown}; the experiment has {list(exp.variants)}")
    rows: list[dict] = []
    stops: list[dict] = []  # runs that ended early (e.g. an iteration with no pairs): their models so far are scored
    task = exp.the_task
    for seed in exp.seeds:
        files = task.write(seed, out / f"world-seed{seed}")
        test = task.test_set(files)
        judge_items = task.judge_items(seed, files, test, exp.eval.judge_problems)
        for variant in names:
            cfg = variant_config(exp, variant, seed, root, files)
            # a model's scores depend on it, the test set, and how it is scored: all three name its cache file
            scoring = content_hash([test, exp.eval.model_dump(), seed, judge_key(cfg)]
                                   + ([] if exp.task == "sort" else [exp.task, judge_items]), 8)
            t0 = time.perf_counter()
            stopped = None
            try:
                run(cfg)
            except NoTrainingDataError as e:  # recorded and counted; the other variants go on
                stopped = f"{type(e).__name__}: {e}"
                if console:
                    console.print(f"[yellow]seed {seed} {variant} stopped:[/] {stopped}", highlight=False)
            seconds = time.perf_counter() - t0
            run_id = run_id_for(cfg)
            if stopped:
                stops.append({"seed": seed, "variant": variant, "run_id": run_id, "reason": stopped})
            with Registry(root) as reg:
                chain = model_chain(reg, run_id)
                trained = [pair_quality(reg, run_id, t, task) if trains_on_pairs(cfg, t)
                           else {**NO_PAIRS, "pairs": 0} for t in range(1, len(chain))]
                sampled = [candidate_accuracy(reg, run_id, t, task) for t in range(1, len(chain) + 1)]
                judged = [own_judgments(reg, run_id, t, task) for t in range(1, len(chain) + 1)]
                paths = {m["model_id"]: model_path(reg, m["model_id"]) for m in chain}  # hash-checked
            for k, model in enumerate(chain):
                cache = out / "eval" / f"{model['model_id']}-{scoring}.json"
                if cache.is_file():
                    scores = with_accuracy(json.loads(cache.read_text()))
                else:
                    scores = score_model(cfg, paths[model["model_id"]], test, exp.eval, seed, task, judge_items)
                    cache.write_text(json.dumps(scores, indent=1))
                row = {"seed": seed, "variant": variant, "model": model["name"], "model_id": model["model_id"],
                       "run_id": run_id, "run_seconds": round(seconds, 1),
                       **{k2: v for k2, v in scores.items() if k2 != "examples"},
                       **(trained[k - 1] if k else NO_PAIRS),
                       "sampled_accuracy": sampled[k], **judged[k]}  # as M_t in iteration t = k + 1, if it ran
                rows.append(row)
                if console:
                    console.print(f"seed {seed} {variant:>15} {model['name']}: {task.metric} {row['accuracy']:.3f}, "
                                  f"judge agreement {_f(row['judge_agreement'])}, pairs {_f(row['pairs'])}, "
                                  f"pair accuracy {_f(row['pair_accuracy'])}", highlight=False)
            (out / "results.json").write_text(json.dumps(
                {"experiment": exp.model_dump(mode="json"), "rows": rows, "stopped": stops}, indent=1))
    return rows


def with_accuracy(row: dict) -> dict:
    """A row or cached score as this version names it: results written before the worlds were tasks call the
    held-out figure `exact_match`."""
    return {**row, "accuracy": row["exact_match"]} if "accuracy" not in row and "exact_match" in row else row


def _f(v, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else (str(v) if isinstance(v, int) else fmt.format(v))


# --- summarising -------------------------------------------------------------------------------------------------------
METRICS = [("accuracy", "held-out accuracy"), ("gain", "accuracy - M1's"),
           ("instruction_accuracy", "instruction-level accuracy"), ("step_accuracy", "held-out step accuracy"),
           ("judge_agreement", "judge agreement"),
           ("pairs", "pairs trained on"), ("pair_accuracy", "pair accuracy"), ("pair_inverted", "pairs inverted"),
           ("mean_tokens", "mean length (tokens)"),
           ("sampled_accuracy", "its samples right"), ("own_score_right", "its judge score of right samples"),
           ("own_score_wrong", "its judge score of wrong samples")]


def summarise(rows: list[dict]) -> list[dict]:
    """Mean, standard deviation and per-seed values of each metric, per (variant, model). `gain` is the exact match
    minus that of M1 of the same seed: seeds start from different M1s, and the change is what a variant did."""
    rows = [with_accuracy(r) for r in rows]
    m1 = {(r["seed"], r["variant"]): r["accuracy"] for r in rows if r["model"] == "M1"}
    rows = [{**r, "gain": r["accuracy"] - m1[(r["seed"], r["variant"])]} for r in rows]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["model"]), []).append(r)
    out = []
    for (variant, model), rs in groups.items():
        entry = {"variant": variant, "model": model, "seeds": [r["seed"] for r in rs]}
        for key, _ in METRICS:
            vals = [r[key] for r in rs if r.get(key) is not None]
            entry[key] = {"mean": statistics.fmean(vals) if vals else None,
                          "sd": statistics.stdev(vals) if len(vals) > 1 else None, "values": vals}
        out.append(entry)
    return out


def _cell(m: dict, pct: bool, sign: bool = False) -> str:
    if m["mean"] is None:
        return "-"
    scale = 100 if pct else 1
    text = (f"{m['mean'] * scale:+.1f}" if sign else f"{m['mean'] * scale:.1f}") if pct else f"{m['mean']:.3g}"
    if m["sd"] is not None:
        text += f" ± {m['sd'] * scale:.1f}" if pct else f" ± {m['sd']:.2g}"
    return text


def table(summary: list[dict], metric: str = "exact match") -> tuple[list[str], list[list[str]]]:
    """The results table; an instruction-level column where the task has that figure (ifworld), a step accuracy
    column where it has that one (arith)."""
    levels = any(e["instruction_accuracy"]["mean"] is not None for e in summary)
    steps = any(e.get("step_accuracy", {}).get("mean") is not None for e in summary)
    header = ["variant", "model", f"{metric} %", "per seed", "change from M1 (points)",
              *(["instruction-level %"] if levels else []), *(["step accuracy %"] if steps else []),
              "judge agreement %", "pairs trained on",
              "pairs right / inverted %", "mean tokens", "its samples right %", "its judge score: right / wrong samples"]
    rows = []
    for e in summary:
        right, wrong = e["own_score_right"]["mean"], e["own_score_wrong"]["mean"]
        own = "-" if right is None or wrong is None else f"{right:.2f} / {wrong:.2f}"
        rows.append([e["variant"], e["model"], _cell(e["accuracy"], True),
                     " / ".join(f"{100 * v:.1f}" for v in e["accuracy"]["values"]),
                     "-" if e["model"] == "M1" else _cell(e["gain"], True, sign=True),
                     *([_cell(e["instruction_accuracy"], True)] if levels else []),
                     *([_cell(e["step_accuracy"], True)] if steps else []),
                     _cell(e["judge_agreement"], True), _cell(e["pairs"], False),
                     _cell(e["pair_accuracy"], True) + " / " + _cell(e["pair_inverted"], True),
                     _cell(e["mean_tokens"], False), _cell(e["sampled_accuracy"], True), own])
    return header, rows


def write_results(exp: ExperimentConfig, root: Path, rows: list[dict]) -> Path:
    out = exp_dir(root, exp)
    summary = summarise(rows)
    task = exp.the_task
    header, body = table(summary, task.metric)
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"# Experiment {exp.name}", "",
             f"Task {exp.task}. Seeds {seeds}; mean ± standard deviation over seeds. "
             f"World: {exp.sizes.model_dump()}.", "",
             f"{task.metric[0].upper() + task.metric[1:]}: greedy answers on the held-out test set. Judge agreement: "
             "the model as judge scores a right answer above a wrong one (0.5 is chance). Pairs and pair accuracy: "
             "the pairs this model was trained on, the share whose chosen answer is better than the rejected one "
             "by ground truth, and the share the wrong way round (the rest tie: both right, or both equally wrong). Its samples, its judge scores: in the iteration where this model was M_t.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             *("| " + " | ".join(r) + " |" for r in body), ""]
    saved = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    stops = saved.get("stopped", [])
    if stops:
        lines += ["Runs that stopped early (their models up to the stop are in the table):", "",
                  *(f"- seed {x['seed']}, {x['variant']} (run {x['run_id']}): {x['reason']}" for x in stops), ""]
    lines += ["![curves](curves.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out / "curves.png", exp.name, task.metric)
    return out / "results.md"


def plot(summary: list[dict], path: Path, title: str, metric: str = "exact match") -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, 3)
    variants = list(dict.fromkeys(e["variant"] for e in summary))
    judged = any(e["judge_agreement"]["mean"] is not None for e in summary)
    stepped = any(e.get("step_accuracy", {}).get("mean") is not None for e in summary)
    middle = ("step_accuracy", axes[1], "held-out step accuracy") if stepped and not judged else \
        ("judge_agreement", axes[1], "judge agreement with ground truth")  # no judge ran: the steps' figure
    for key, ax, label in (("gain", axes[0], f"held-out {metric}: change from M1"), middle,
                           ("pair_accuracy", axes[2], "pairs right by ground truth (trained on)")):
        for v in variants:
            es = [e for e in summary if e["variant"] == v and e[key]["mean"] is not None]
            if not es:
                continue
            xs = [int(e["model"][1:]) for e in es]
            ys = [e[key]["mean"] for e in es]
            err = [e[key]["sd"] or 0 for e in es]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=v)
        ax.set_title(label)
        ax.set_xlabel("model (M1 = SFT)")
        if key != "gain":
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].axhline(0, color="grey", lw=1, ls="--")
    if middle[0] == "judge_agreement":
        axes[1].axhline(0.5, color="grey", lw=1, ls="--")  # chance
    axes[0].legend(fontsize=8)
    fig.suptitle(f"experiment {title}: mean ± sd over seeds")
    fig.savefig(path, dpi=100)
    return path
