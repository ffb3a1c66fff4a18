"""Judge quality: how well a model's judge scores agree with human rankings (the paper's check on held-out,
human-ranked Open Assistant replies; ../shared/METHOD.md).

    data = load_seed_data("oasst_valid.jsonl")                    # RankedPrompt: instruction + (reply, human rank)
    replies = judge_ranked(cfg, data.ranked, "data_registry/models/<id>")   # the model judges every ranked reply
    report = agreement(by_prompt(replies))                        # pure: {prompt: [(human_rank, judge_score), ...]}

`flywheel eval judge` (flywheel/cli/eval.py) runs both and prints the report. Definitions:
- A reply's judge score is the mean of its `judge.samples` parsed verdicts (`score_parser.parse_score`); with
  `judge.mode: prob`, the expected score from one forward pass (`judge.prob_verdict`, one "sample" per reply); both
  through `judge.verdicts`, as the judge stage judges. A reply with no valid verdict (or too little probability on
  "0".."5": `low_prob_mass`) is *unscored*: left out of every metric and counted, never scored 0. A reply with no
  human rank is *unranked*: not judged, counted.
- Pairwise accuracy: over all pairs of scored replies to the same prompt that humans ranked differently (rank 0 is
  best), the share the judge orders the same way. `ranked_pairs` counts every pair humans ranked differently;
  `pairs` those of them where both replies were scored, the rest (`pairs_unscored`) are skipped and counted. Pairs the judge scores equally are *judge ties*, reported
  separately: `pairwise_accuracy` leaves them out (agree / (agree + disagree)), and `pairwise_accuracy_ties_as_wrong`
  is agree / all pairs, for comparison with reports that count ties as errors.
- Spearman and Kendall tau (tau-b, which handles ties) between the judge's score and the human order (negated rank,
  so +1 is full agreement), computed per prompt with at least 2 distinct human ranks among its scored replies, then
  averaged over prompts. Per prompt, not pooled: humans ranked replies within a prompt, so rank 0 of one prompt
  says nothing about rank 1 of another. A prompt where the judge gave every reply the same score has no defined
  correlation: it is left out of the averages and counted (`prompts_judge_constant`); its pairs are judge ties.
- A prompt gives no pair when its ranked replies share one rank (or it has one), counted in `prompts_one_rank`, or
  when its scored replies do (too few scored), counted in `prompts_unscored`.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Mapping, Sequence

from scipy import stats

from ..config import FlywheelConfig, content_hash
from ..stages.seeds import RankedPrompt


@dataclass
class Agreement:
    prompts: int = 0                  # prompts in the data
    prompts_compared: int = 0         # with >= 2 distinct human ranks among scored replies
    prompts_correlated: int = 0       # of those, with a defined correlation (in the Spearman/Kendall means)
    prompts_judge_constant: int = 0   # of those, where the judge scored every reply the same (left out of the means)
    prompts_one_rank: int = 0         # skipped: fewer than 2 distinct human ranks among the ranked replies
    prompts_unscored: int = 0         # skipped: 2+ distinct human ranks, but not among the scored replies
    replies: int = 0
    unranked: int = 0                 # no human rank: excluded
    unscored: int = 0                 # ranked but no valid judge score: excluded, never scored 0
    ranked_pairs: int = 0             # pairs of ranked replies that humans ranked differently, scored or not
    pairs: int = 0                    # of those, pairs of two scored replies: the ones compared
    pairs_unscored: int = 0           # of those, skipped: a reply has no valid judge score
    agree: int = 0
    disagree: int = 0
    judge_ties: int = 0               # pairs the judge scored equally: not in `pairwise_accuracy`
    pairwise_accuracy: float | None = None              # agree / (agree + disagree)
    pairwise_accuracy_ties_as_wrong: float | None = None  # agree / pairs
    judge_tie_rate: float | None = None                 # judge_ties / pairs
    spearman: float | None = None     # mean over prompts_correlated
    kendall_tau: float | None = None  # tau-b, mean over prompts_correlated

    def as_dict(self) -> dict:
        return asdict(self)


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def agreement(data: Mapping[str, Sequence[tuple[int | None, float | None]]]) -> Agreement:
    """Agreement of judge scores with human ranks; `data` maps a prompt to its replies' (human_rank, judge_score)."""
    out = Agreement(prompts=len(data))
    spearman, kendall = [], []
    for replies in data.values():
        out.replies += len(replies)
        out.unranked += sum(rank is None for rank, _ in replies)
        ranked = [(rank, score) for rank, score in replies if rank is not None]
        scored = [(rank, score) for rank, score in ranked if score is not None and not math.isnan(score)]
        out.unscored += len(ranked) - len(scored)
        out.ranked_pairs += sum(a != b for (a, _), (b, _) in combinations(ranked, 2))
        if len({rank for rank, _ in ranked}) < 2:
            out.prompts_one_rank += 1
            continue
        if len({rank for rank, _ in scored}) < 2:
            out.prompts_unscored += 1
            continue
        out.prompts_compared += 1
        for i, (rank_a, score_a) in enumerate(scored):
            for rank_b, score_b in scored[i + 1:]:
                if rank_a == rank_b:
                    continue  # humans did not order this pair
                out.pairs += 1
                if score_a == score_b:
                    out.judge_ties += 1
                elif (rank_a < rank_b) == (score_a > score_b):
                    out.agree += 1
                else:
                    out.disagree += 1
        if len({score for _, score in scored}) < 2:
            out.prompts_judge_constant += 1
            continue
        human = [-rank for rank, _ in scored]
        judge = [score for _, score in scored]
        spearman.append(stats.spearmanr(human, judge).statistic)
        kendall.append(stats.kendalltau(human, judge).statistic)
    out.prompts_correlated = len(spearman)
    out.pairs_unscored = out.ranked_pairs - out.pairs
    out.pairwise_accuracy = _ratio(out.agree, out.agree + out.disagree)
    out.pairwise_accuracy_ties_as_wrong = _ratio(out.agree, out.pairs)
    out.judge_tie_rate = _ratio(out.judge_ties, out.pairs)
    if spearman:
        out.spearman = sum(spearman) / len(spearman)
        out.kendall_tau = sum(kendall) / len(kendall)
    return out


@dataclass
class JudgedReply:
    prompt_id: str
    reply_index: int
    human_rank: int | None
    score: float | None  # mean of the valid samples; None if none was valid (or the reply is unranked)
    sample_scores: list[float | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # parse error codes of the invalid samples


def prompt_keys(ranked: list[RankedPrompt]) -> list[str]:
    """One unique key per prompt: its id, with `#i` added where ids repeat."""
    counts = Counter(p.id for p in ranked)
    return [p.id if counts[p.id] == 1 else f"{p.id}#{i}" for i, p in enumerate(ranked)]


def by_prompt(replies: list[JudgedReply]) -> dict[str, list[tuple[int | None, float | None]]]:
    out: dict[str, list[tuple[int | None, float | None]]] = defaultdict(list)
    for r in replies:
        out[r.prompt_id].append((r.human_rank, r.score))
    return dict(out)


def judge_ranked(cfg: FlywheelConfig, ranked: list[RankedPrompt], model_path: str | Path,
                 device: str | None = None) -> list[JudgedReply]:
    """The model at `model_path` judges every ranked reply: `cfg.judge.template` filled with the instruction and the
    reply, `cfg.judge.samples` samples through the configured backend (`cfg.generate`), parsed and averaged; in
    `judge.mode: prob`, one forward pass and the expected score. Unranked replies are listed with no score and not
    judged."""
    from ..backends import make_backend
    from ..backends.models import resolve_device
    from ..progress import progress
    from ..stages.judge import check_judge, read_judge_template, verdicts

    check_judge(cfg)
    c = cfg.judge
    template = read_judge_template(c)  # judge.template, or judge.verify_template in verify mode
    out: list[JudgedReply] = []
    todo: list[tuple[JudgedReply, tuple[str, str]]] = []  # (reply, (instruction, reply text)) for each ranked reply
    for key, p in zip(prompt_keys(ranked), ranked):
        for j, reply in enumerate(p.replies):
            out.append(JudgedReply(key, j, reply.rank, None))
            if reply.rank is not None:
                todo.append((out[-1], (p.instruction, reply.text)))
    if not todo:
        return out
    backend = make_backend(cfg.generate, str(model_path), device or resolve_device(cfg.run.device),
                           ray=cfg.ray)
    batches = [todo[i : i + c.batch_size] for i in range(0, len(todo), c.batch_size)]
    for b, batch in enumerate(progress(batches, "judging ranked replies")):
        seed = int(content_hash(["eval-judge", b, cfg.run.seed], 8), 16)
        for (reply, _), v in zip(batch, verdicts(backend, template, [item for _, item in batch], c, seed)):
            reply.score, reply.sample_scores, reply.errors = v.score, v.scores, [e for e in v.errors if e]
    return out


def resolve_model(spec: str, registry_root: Path) -> dict:
    """A model folder, or a registered model by id or by name (PT, M1, M2, ...: the newest of that name).
    Returns {"path", "model_id", "name"}; ValueError with what was tried when nothing matches."""
    if Path(spec).is_dir():
        if not any((Path(spec) / name).is_file() for name in ("config.json", "adapter_config.json")):
            raise ValueError(f"--model {spec}: the folder holds no config.json, so it is not a saved model")
        return {"path": str(spec), "model_id": None, "name": None}
    from ..registry import Registry, RegistryLockedError, RegistrySchemaError
    from ..registry.integrity import model_path

    db = Path(registry_root) / "flywheel.duckdb"
    if not db.is_file():
        raise ValueError(f"--model {spec}: not a model folder, and there is no registry at {db} to look it up in "
                         "(set --registry)")
    try:
        with Registry(registry_root, read_only=True) as reg:
            rows = reg.rows("SELECT model_id, name, path FROM models WHERE model_id = ? OR name = ? "
                            "ORDER BY model_id = ? DESC, created_at DESC LIMIT 1", [spec, spec, spec])
            if rows:  # the folder checked against its registered weights hash
                rows[0]["path"] = model_path(reg, rows[0]["model_id"])
            names = [r["name"] for r in reg.rows("SELECT DISTINCT name FROM models ORDER BY name")]
    except (RegistryLockedError, RegistrySchemaError) as e:
        raise ValueError(str(e)) from None
    if not rows:
        raise ValueError(f"--model {spec}: not a model folder, nor a model id or name in {db} "
                         f"(names there: {', '.join(names) or 'none'})")
    return rows[0]
