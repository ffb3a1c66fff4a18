"""Iteration 0 before training: import the seeds, make the base model (PT), and build M1's SFT examples.

`import_seeds` reads `seeds.path` in `seeds.format` (see flywheel/stages/seeds.py): each seed prompt becomes a `prompts` row
(source 'seed', its IFT answer as `reference`), and human-ranked replies (Open Assistant trees) go to
`seed_responses` with their rank. `sft_examples` makes EFT from those rankings when the import has any, else the
synthetic 5/2/0 examples; M1 is trained on them by `flywheel.training.sft.train_m1`.
"""

from __future__ import annotations

from pathlib import Path

from ..backends.bases import convert_gguf, resolve_base
from ..backends.models import build_tiny_model, build_tokenizer, resolve_device, save_atomically
from ..config import FlywheelConfig, content_hash
from ..registry import Registry, now
from ..registry.integrity import accept_model, reopen_if_missing, weights_sha256
from ..registry.reads import seeds_from_registry
from ..stage import StageResult, load_template, run_stage, stage_run_id
from ..training.common import loops
from .seeds import RankedPrompt, load_seed_data, pretrain_corpus


def import_seeds(cfg: FlywheelConfig, run_id: str) -> StageResult:
    data = load_seed_data(cfg.seeds.path, cfg.seeds.format)  # parse first: a malformed file fails before any write
    seeds = data.ift
    # A ranked prompt shares the prompt row of the IFT seed from the same record (same id and text); the others get
    # a prompt row of their own, with no reference answer.
    index = {(s.id, s.instruction): i for i, s in reversed(list(enumerate(seeds)))}
    extra: list[RankedPrompt] = []
    slots = []  # the prompt row of each ranked prompt
    for r in data.ranked:
        if (r.id, r.instruction) not in index:
            extra.append(r)
        slots.append(index.get((r.id, r.instruction), len(seeds) + len(extra) - 1))
    inputs = {"seeds": [s.__dict__ for s in seeds]}  # a seed set without rankings keeps the key it always had
    if data.ranked:
        inputs["ranked"] = [[r.id, r.instruction, [list(x) for x in r.replies]] for r in data.ranked]

    def work(reg: Registry, sid: str) -> dict:
        common = dict(run_id=run_id, iteration=0, source="seed", few_shot_ids=None, kept=True, drop_reason=None,
                      model_id=None, stage_run_id=sid, config_hash=cfg.config_hash(), created_at=now())
        prompts = [(s.id, s.instruction, s.response) for s in seeds] + [(r.id, r.instruction, None) for r in extra]
        ids = [f"p-{content_hash([sid, i])}" for i in range(len(prompts))]
        reg.insert("prompts", [dict(prompt_id=pid, text=text, reference=ref, seed_id=seed_id, **common)
                               for pid, (seed_id, text, ref) in zip(ids, prompts)])
        responses = []
        for r, slot in zip(data.ranked, slots):
            pid = ids[slot]
            responses += [dict(response_id=f"sr-{content_hash([sid, pid, j])}", prompt_id=pid, text=x.text,
                               human_rank=x.rank, stage_run_id=sid, created_at=now())
                          for j, x in enumerate(r.replies)]
        reg.insert("seed_responses", responses)
        return {"seeds": len(seeds), "prompts": len(prompts), "ranked_prompts": len(data.ranked),
                "seed_responses": len(responses), "skipped": data.skipped, "format": data.format,
                "path": str(cfg.seeds.path)}

    return run_stage(cfg, "seeds", run_id, 0, None, inputs, work)


def build_base(cfg: FlywheelConfig, run_id: str, seeds_sid: str) -> StageResult:
    """The PT model. 'tiny': a tokenizer and a small Llama trained from scratch on the seed corpus (plus the
    unlabeled text of `model.tiny.corpus`, if set). A GGUF file (or a built-in name for one) is converted once into
    the registry. A model folder or hub id is registered as it is, and loaded with from_pretrained when used. A real
    base is keyed by the sha256 of its weights (flywheel/backends/bases.py), never by its path."""
    device = resolve_device(cfg.run.device)
    spec = resolve_base(cfg.model.base)
    with Registry(cfg.registry.root) as reg:
        templates = [load_template(reg, cfg.judge.template, "judge")[0],
                     load_template(reg, cfg.self_instruct.template, "self_instruct")[0]]
    tiny = spec.kind == "tiny"
    extra = read_corpus(cfg.model.tiny.corpus) if tiny and cfg.model.tiny.corpus else []
    inputs = {"base": cfg.model.base, "tiny": cfg.model.tiny.model_dump(mode="json", exclude={"corpus"}) if tiny else None,
              "seeds": seeds_sid, "templates": templates, "seed": cfg.run.seed}
    if not tiny:  # the weights decide the model; the seeds and templates only train a tiny one
        inputs = {"base": spec.key()}
    if extra:
        inputs["corpus"] = content_hash(extra)  # the text, not the path, decides the model

    def work(reg: Registry, sid: str) -> dict:
        metrics: dict = {}
        path = cfg.model.base if spec.path is None else str(spec.path)
        seeds = seeds_from_registry(reg, seeds_sid) if tiny else []
        reg.release()  # building or converting the base takes minutes without the registry: readers get in
        if tiny:
            t = cfg.model.tiny
            corpus = pretrain_corpus(seeds, templates, cfg.run.seed) + extra
            tokenizer = build_tokenizer(corpus, t.vocab_size, split_digits=t.split_digits)
            model = build_tiny_model(t, tokenizer, cfg.run.seed)
            if t.pretrain_steps:
                metrics = loops().causal_lm_train(model, tokenizer, corpus, steps=t.pretrain_steps, lr=t.pretrain_lr,
                                          batch_size=t.pretrain_batch_size, max_length=t.max_position,
                                          device=device, seed=cfg.run.seed)
            path = reg.model_dir(sid)
            save_atomically(model, tokenizer, path)
            metrics["parameters"] = sum(p.numel() for p in model.parameters())
            sha = accept_model(path, metrics, what=f"PT (the tiny base, stage {sid})",
                               hint=f"The learning rate is probably too high: lower model.tiny.pretrain_lr "
                                    f"(now {t.pretrain_lr}).")
        elif spec.kind == "gguf":
            path = reg.model_dir(sid)
            metrics = convert_gguf(spec.path, path)
            sha = accept_model(path, metrics, what=f"PT (converted from {spec.path}, stage {sid})",
                               hint=f"The GGUF file itself holds them: check model.base ({cfg.model.base}).")
        elif spec.kind == "folder":
            sha = weights_sha256(path)  # the folder stays where it is: checked, not written to
        else:
            sha = None  # a hub id: nothing on this machine to hash
        if spec.sha256:
            metrics["weights_sha256"] = spec.sha256  # of the source (the GGUF file, the folder): the stage's key
        reg.register_model(model_id=sid, run_id=run_id, name="PT", kind="base", iteration=0, parent_id=None,
                           path=str(path), stage_run_id=sid, config_hash=cfg.config_hash(), metrics=metrics,
                           weights_sha256=sha)
        return {"model_id": sid, "path": str(path), **metrics}

    with Registry(cfg.registry.root) as reg:  # a tiny or converted base whose folder has gone is built again
        reopen_if_missing(reg, stage_run_id("base", inputs))
    return run_stage(cfg, "base", run_id, 0, None, inputs, work)


def read_corpus(path) -> list[str]:
    """The documents of an unlabeled text file (`model.tiny.corpus`): blocks separated by a blank line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model.tiny.corpus: file not found: {path}")
    docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    if not docs:
        raise ValueError(f"model.tiny.corpus: {path} holds no text")
    return docs
