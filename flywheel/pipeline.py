"""One flywheel run, read top to bottom: what runs, in which order, on what. No Prefect here.

    run_id = run(cfg)                                   # lock; seeds -> PT -> M1; iterations 1..n; the report
    state = run_bootstrap(cfg, run_id)                  # iteration 0: seeds, base model (PT), M1
    state = run_iteration(cfg, run_id, 1, state)        # M_t -> M_{t+1}

Every stage is a `Step` (flywheel/stage.py): it reads fields of the `IterationState` (stage run ids, model ids) and
adds one. An iteration is the data steps below, then the trainer `train.trainer` names (flywheel/training/: its
stage reads what it `consumes`). `flows/` wraps these same functions as Prefect flows and each step as a task (the
`call` and `iterate` arguments); the CLI, `resume`, the nightly schedule, `experiment`, the benches and the tests
all come through here. Each stage skips what the registry already holds, so calling `run` again resumes a run.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

from . import tracking
from .analysis import report
from .config import ConfigError, FlywheelConfig
from .registry import Registry, runs
from .registry.lock import registry_lock
from .stage import IterationState, StageContext, Step
from .stages import bootstrap, generate, judge, meta_judge, pairs, reward, self_instruct
from .training import M1_SFT, TRAINERS, Trainer

log = logging.getLogger("flywheel")

# --- iteration 0 -----------------------------------------------------------------------------------------------------
SEEDS = Step("seeds", (), "seeds", lambda ctx, s: bootstrap.import_seeds(ctx.cfg, ctx.run_id))
BASE = Step("base", ("seeds",), "pt", lambda ctx, s: bootstrap.build_base(ctx.cfg, ctx.run_id, s.seeds))
M1 = Step("sft", ("pt", "seeds"), "m1", M1_SFT.stage)
BOOTSTRAP = (SEEDS, BASE, M1)

# --- each iteration: the data steps, then the trainer ----------------------------------------------------------------
SELF_INSTRUCT = Step("self_instruct", ("model", "seeds", "earlier_prompts"), "prompts",
                     lambda ctx, s: self_instruct.self_instruct(ctx.cfg, ctx.run_id, ctx.iteration, s.model, s.seeds,
                                                                list(s.earlier_prompts)))
GENERATE = Step("generate", ("model", "prompts", "m1"), "candidates",
                lambda ctx, s: generate.generate(ctx.cfg, ctx.run_id, ctx.iteration, s.model, s.prompts,
                                                 anchor_model(ctx, s)))
JUDGE = Step("judge", ("model", "candidates"), "judgments",
             lambda ctx, s: judge.judge(ctx.cfg, ctx.run_id, ctx.iteration, s.model, s.candidates),
             when=lambda cfg: "judge" in cfg.reward.weights)  # a weight of 0 keeps the judge for the report's monitors
META_JUDGE = Step("meta_judge", ("model", "judgments"), "judge_pairs",
                  lambda ctx, s: meta_judge.meta_judge(ctx.cfg, ctx.run_id, ctx.iteration, s.model, s.judgments),
                  when=lambda cfg: cfg.meta_judge.enabled and JUDGE.when(cfg))
REWARD = Step("reward", ("candidates", "m1", "pt", "model"), "rewards",
              lambda ctx, s: reward.reward(ctx.cfg, ctx.run_id, ctx.iteration, s.candidates, s.m1, s.pt, s.model),
              when=lambda cfg: bool(cfg.reward.coherent or cfg.reward.rules or cfg.steps.enabled))
PAIRS = Step("pairs", ("judgments", "rewards", "model", "m1"), "pairs",
             lambda ctx, s: pairs.build_pairs(ctx.cfg, ctx.run_id, ctx.iteration, s.judgments, s.rewards,
                                              anchor_model(ctx, s)))
DATA_STEPS = (SELF_INSTRUCT, GENERATE, JUDGE, META_JUDGE, REWARD, PAIRS)


def anchor_model(ctx: StageContext, s: IterationState) -> str | None:
    """Temporal anchoring's past model (`pairs.anchor: m1`), whose candidates GENERATE adds and PAIRS rejects; None
    when it is off, when M_t is M1 (iteration 1: the usual pairs) or when the trainer does not train on pairs (RS-SFT's
    best of N must not pick M1's candidates)."""
    trains_on_pairs = "pairs" in TRAINERS[ctx.cfg.train.trainer_for(ctx.iteration)].consumes
    return s.m1 if ctx.cfg.pairs.anchor == "m1" and s.m1 != s.model and trains_on_pairs else None


def train_step(trainer: Trainer) -> Step:
    return Step(trainer.name, ("model", *trainer.consumes), "model", trainer.stage)


def steps_for(cfg: FlywheelConfig, iteration: int) -> list[Step]:
    """The steps of iteration `iteration`: the data steps its config turns on, then its trainer. A trainer on the seeds
    alone (the plain-SFT baseline) skips the data steps, and one that does not train on judge pairs the meta-judge."""
    trainer = TRAINERS[cfg.train.trainer_for(iteration)]
    data = [s for s in DATA_STEPS if s.when(cfg) and (s is not META_JUDGE or "judge_pairs" in trainer.consumes)]
    data = data if trainer.needs_iteration_data else []
    return [*data, train_step(trainer)]


# How a step is called: here, directly; the Prefect flow passes one that runs it as a task.
Call = Callable[[Step, StageContext, IterationState], IterationState]


def call_here(step: Step, ctx: StageContext, state: IterationState) -> IterationState:
    return step(ctx, state)[1]


def run_bootstrap(cfg: FlywheelConfig, run_id: str, call: Call = call_here) -> IterationState:
    """Seeds -> PT -> M1. The state iteration 1 starts from (M_t = M1)."""
    ctx, state = StageContext(cfg, run_id, 0), IterationState()
    with registry_lock(cfg.registry.root, run_id):
        for step in BOOTSTRAP:
            state = call(step, ctx, state)
    return replace(state, model=state.m1)


def run_iteration(cfg: FlywheelConfig, run_id: str, iteration: int, state: IterationState,
                  call: Call = call_here) -> IterationState:
    """M_t -> M_{t+1}: each step of `steps_for(cfg, iteration)` on the state carried from the last. Returns the state
    the next iteration starts from (its M_t, and this iteration's prompts among the earlier ones)."""
    ctx = StageContext(cfg, run_id, iteration)
    with registry_lock(cfg.registry.root, run_id):
        with ctx.registry() as reg:
            reg.start_iteration(run_id, iteration, state.model)
        for step in steps_for(cfg, iteration):
            state = call(step, ctx, state)
        with ctx.registry() as reg:
            reg.finish_iteration(run_id, iteration, state.model)
    return next_state(state)


def next_state(state: IterationState) -> IterationState:
    earlier = state.earlier_prompts + ((state.prompts,) if state.prompts else ())
    return IterationState(seeds=state.seeds, pt=state.pt, m1=state.m1, model=state.model, earlier_prompts=earlier)


def run(cfg: FlywheelConfig, call: Call = call_here, iterate=run_iteration) -> str:
    """Run (or resume) the flywheel of `cfg`: seeds -> PT -> M1, then `run.iterations` iterations, then the report
    (Markdown + plots in the registry). Holds the registry lock throughout: a second run on the same registry stops at
    once (RegistryBusyError, naming this one). An iteration the registry records as finished is skipped whole. Returns
    the run id. `iterate(cfg, run_id, t, state, call)` runs one iteration (the flow passes a Prefect subflow)."""
    run_id = runs.run_id_for(cfg)
    ctx = StageContext(cfg, run_id)
    with registry_lock(cfg.registry.root, run_id):
        with ctx.registry() as reg:
            already_done = reg.scalar("SELECT status FROM runs WHERE run_id = ?", [run_id]) == "done"
            runs.start_run(reg, cfg)  # a re-run of a finished run changes nothing, and writes no new report
        try:
            state = run_bootstrap(cfg, run_id, call)
            for t in range(1, cfg.run.iterations + 1):
                with ctx.registry() as reg:
                    done = runs.finished_iteration(reg, run_id, t)
                if done:
                    state = next_state(replace(state, model=done["model_id"], prompts=done["prompts_sid"]))
                    continue
                state = iterate(cfg, run_id, t, state, call)
                with ctx.registry() as reg:
                    warn_monitors(reg, run_id, t)
                    tracking.log_iteration(reg, cfg, run_id, t)  # train.report_to: the report's figures, step t
        except BaseException:
            with ctx.registry() as reg:
                reg.finish_run(run_id, "failed")
                try:  # the report says it failed, where and why, beside the figures of what finished
                    report.write(reg, run_id)
                except Exception as e:  # never hide the failure itself behind one of the report's
                    log.warning("the failed run's report could not be written: %s", e)
            raise
        with ctx.registry() as reg:
            reg.finish_run(run_id, "done")
            if not already_done or not (report.report_dir(reg, run_id) / "report.md").is_file():
                report.write(reg, run_id)
    return run_id


def warn_monitors(reg: Registry, run_id: str, iteration: int) -> None:
    """Log each reward-hacking monitor that fired on this iteration as a warning (Prefect shows the 'flywheel'
    logger's records in the flow run's log)."""
    for c in report.warnings_for(reg, run_id, iteration):
        log.warning("monitor %s (%s), iteration %d: %s", c.name, c.failure_mode, iteration, c.message)


def preflight(cfg: FlywheelConfig) -> None:
    """Fail before the run starts on inputs that are missing or malformed, or that a stage would fail on after minutes
    of work: a seed longer than seeds.max_chars, a template whose fields are not exactly what its stage fills in (or
    with a stray brace), a prompts file too small for the run, a train.report_to whose package is not installed.
    (Bad values are refused when the config loads.)"""
    from .backends import check_backend
    from .backends.bases import resolve_base
    from .stages.seeds import load_seed_data

    tracking.check(cfg.train.report_to)  # transformers would fail at the first trainer, after hours of generation
    resolve_base(cfg.model.base)  # a missing package or file, or a GGUF this install cannot read: named here
    data = load_seed_data(cfg.seeds.path, cfg.seeds.format, max_chars=cfg.seeds.max_chars)
    check_backend(cfg.generate, cfg.ray)
    judge.check_judge(cfg)  # its template too: M1's EFT fills it even when the judge stage is off
    if cfg.meta_judge.enabled:
        meta_judge.check_meta_judge(cfg)
        if not any(META_JUDGE in steps_for(cfg, t) for t in range(1, cfg.run.iterations + 1)):
            raise ConfigError("meta_judge.enabled: no iteration's trainer trains on judge pairs (train.trainer: dpo "
                              "does); set meta_judge.enabled=false")
    if cfg.steps.enabled:  # process rewards: the step rule importable, the step judge's template fillable
        from .stages import steps
        if cfg.steps.rule:
            steps.load_step_rule(cfg.steps.rule)
        if cfg.steps.judge:
            steps.check_step_judge(cfg)
    if cfg.model.base == "tiny" and cfg.model.tiny.corpus:
        bootstrap.read_corpus(cfg.model.tiny.corpus)
    if not cfg.self_instruct.template.is_file():  # the base stage reads it in any mode
        raise ConfigError(f"self_instruct.template: template file not found: {cfg.self_instruct.template}")
    rounds = sum(SELF_INSTRUCT in steps_for(cfg, t) for t in range(1, cfg.run.iterations + 1))
    seed_prompts = {s.instruction for s in data.ift} | {r.instruction for r in data.ranked}
    self_instruct.check_self_instruct(cfg, seed_prompts, rounds)
