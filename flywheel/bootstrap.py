"""Iteration 0: import the seeds, make the base model (PT), fine-tune it into M1 (SFT on IFT + EFT)."""

from __future__ import annotations

from .backends import release_backends
from .config import FlywheelConfig, content_hash
from .models import build_tiny_model, build_tokenizer, load, resolve_device, save_atomically
from .registry import Registry, now
from .seeds import Seed, eft_examples, ift_examples, load_seeds, pretrain_corpus
from .stage import StageResult, load_template, run_stage
from .train import causal_lm_train, sft_train


def import_seeds(cfg: FlywheelConfig, run_id: str) -> StageResult:
    seeds = load_seeds(cfg.seeds.path)  # parse first: a malformed file fails before anything is written
    inputs = {"seeds": [s.__dict__ for s in seeds]}

    def work(reg: Registry, sid: str) -> dict:
        reg.insert("prompts", [
            dict(prompt_id=f"p-{content_hash([sid, i])}", run_id=run_id, iteration=0, source="seed",
                 text=s.instruction, reference=s.response, seed_id=s.id, few_shot_ids=None, kept=True,
                 drop_reason=None, model_id=None, stage_run_id=sid, config_hash=cfg.config_hash(),
                 created_at=now())
            for i, s in enumerate(seeds)
        ])
        return {"seeds": len(seeds), "path": str(cfg.seeds.path)}

    return run_stage(cfg, "seeds", run_id, 0, None, inputs, work)


def seeds_from_registry(reg: Registry, seeds_sid: str) -> list[Seed]:
    rows = reg.rows("SELECT seed_id, text, reference FROM prompts WHERE stage_run_id = ? ORDER BY prompt_id", [seeds_sid])
    return [Seed(r["seed_id"], r["text"], r["reference"]) for r in rows]


def build_base(cfg: FlywheelConfig, run_id: str, seeds_sid: str) -> StageResult:
    """The PT model. 'tiny': a tokenizer and a small Llama trained from scratch on the seed corpus; otherwise the
    user's model (a path or hub id) is registered as it is, and loaded with from_pretrained when used."""
    device = resolve_device(cfg.run.device)
    with Registry(cfg.registry.root) as reg:
        templates = [load_template(reg, cfg.judge.template, "judge")[0],
                     load_template(reg, cfg.self_instruct.template, "self_instruct")[0]]
    tiny = cfg.model.base == "tiny"
    inputs = {"base": cfg.model.base, "tiny": cfg.model.tiny.model_dump() if tiny else None,
              "seeds": seeds_sid, "templates": templates, "seed": cfg.run.seed}

    def work(reg: Registry, sid: str) -> dict:
        metrics: dict = {}
        path = cfg.model.base
        if tiny:
            t = cfg.model.tiny
            corpus = pretrain_corpus(seeds_from_registry(reg, seeds_sid), templates, cfg.run.seed)
            tokenizer = build_tokenizer(corpus, t.vocab_size)
            model = build_tiny_model(t, tokenizer, cfg.run.seed)
            if t.pretrain_steps:
                metrics = causal_lm_train(model, tokenizer, corpus, steps=t.pretrain_steps, lr=t.pretrain_lr,
                                          batch_size=t.pretrain_batch_size, max_length=t.max_position,
                                          device=device, seed=cfg.run.seed)
            path = reg.model_dir(sid)
            save_atomically(model, tokenizer, path)
            metrics["parameters"] = sum(p.numel() for p in model.parameters())
        reg.register_model(model_id=sid, run_id=run_id, name="PT", kind="base", iteration=0, parent_id=None,
                           path=str(path), stage_run_id=sid, config_hash=cfg.config_hash(), metrics=metrics)
        return {"model_id": sid, "path": str(path), **metrics}

    return run_stage(cfg, "base", run_id, 0, None, inputs, work)


def train_sft(cfg: FlywheelConfig, run_id: str, base_id: str, seeds_sid: str) -> StageResult:
    """M1: SFT of the base model on IFT (seed answers) and, by default, EFT (judge-training) examples."""
    device = resolve_device(cfg.run.device)
    with Registry(cfg.registry.root) as reg:
        judge_text, judge_hash = load_template(reg, cfg.judge.template, "judge")
    inputs = {"base": base_id, "seeds": seeds_sid, "sft": cfg.sft.model_dump(), "eft": cfg.seeds.eft,
              "judge_template": judge_hash, "seed": cfg.run.seed}

    def work(reg: Registry, sid: str) -> dict:
        seeds = seeds_from_registry(reg, seeds_sid)
        examples = ift_examples(seeds)
        n_eft = 0
        if cfg.seeds.eft:
            eft = eft_examples(seeds, judge_text, cfg.run.seed)
            examples, n_eft = examples + eft, len(eft)
        release_backends()
        model, tokenizer = load(reg.model(base_id)["path"], device)
        s = cfg.sft
        metrics = sft_train(model, tokenizer, examples, epochs=s.epochs, lr=s.learning_rate, batch_size=s.batch_size,
                            max_length=s.max_length, device=device, seed=cfg.run.seed)
        save_atomically(model, tokenizer, reg.model_dir(sid))
        reg.register_model(model_id=sid, run_id=run_id, name="M1", kind="sft", iteration=0, parent_id=base_id,
                           path=str(reg.model_dir(sid)), stage_run_id=sid, config_hash=cfg.config_hash(),
                           metrics=metrics)
        return {"model_id": sid, "path": str(reg.model_dir(sid)), "ift": len(seeds), "eft": n_eft, **metrics}

    return run_stage(cfg, "sft", run_id, 0, base_id, inputs, work)
