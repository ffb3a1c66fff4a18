"""One pydantic model for the whole run, loaded from YAML with `a.b=c` overrides.

    cfg = load_config("configs/demo.yaml", ["generate.n=8", "run.iterations=3"])

Every section forbids unknown keys, so a typo fails loudly. `load_config` raises `ConfigError`, whose message names each
bad field (`generate.n: Input should be a valid integer, got 'x'`); the CLI prints it and exits 2 without a traceback.
Defaults are the papers' numbers for real models (see ../shared/METHOD.md); `configs/demo.yaml` overrides what a tiny
CPU model needs.

What would crash or hang a stage after minutes of work is refused here, naming the field: a float that is NaN or
infinite, true/false for a number, greedy sampling (temperature 0) where several samples are drawn, and sizes past
what real models use (`MAX_ITERATIONS`, `MAX_NEW_TOKENS`, `MAX_LENGTH`, `MAX_N`, `MAX_JUDGE_SAMPLES`). What needs
the files (seed lengths, template fields, the prompts file) is checked by `flywheel.pipeline.preflight`.

Paths to flywheel's own files (`prompts/*.txt`, `seeds/demo.jsonl`, `configs/deepspeed/*.json`) default to this
checkout's copies, so a run works from any folder. A relative path you give means the current folder; only when the
file is not there and flywheel ships one of that name is flywheel's used (`shipped`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, ValidationError, field_validator,
                      model_validator)

from .analysis.monitors import MonitorsConfig


class ConfigError(ValueError):
    """A config that cannot be used; the message is written for a person and names the field."""


# Bounds that fit real models: beyond them a stage allocates gigabytes or runs for days before it fails.
MAX_ITERATIONS = 1000      # the papers run 2-4 self-rewarding iterations
MAX_NEW_TOKENS = 32768     # longer than any reply a judge or a policy writes; real chat models cap output near this
MAX_LENGTH = 131072        # training sequence: the longest context of current open models (128k)
MAX_N = 512                # candidates per prompt (paper: 4; best-of-n studies go to a few hundred)
MAX_JUDGE_SAMPLES = 64     # judge samples per candidate (paper: 3)
MAX_EPOCHS = 1000          # passes over a training set (papers: 1-3)

REPO = Path(__file__).resolve().parents[1]  # the checkout: prompts/, seeds/, configs/


def shipped(path: Path) -> Path:
    """A relative path as given (the current folder) when the file is there; else flywheel's own file of that name
    (prompts/judge.txt, seeds/demo.jsonl, ...) when it ships one, so the defaults and configs/*.yaml work from any
    folder. Any other path is kept as given."""
    if path.is_absolute() or path.exists() or not (REPO / path).exists():
        return path
    return REPO / path


def _portable(path: Path) -> str:
    """Flywheel's own files are written (and hashed) as the relative path that finds them from anywhere (`shipped`),
    so a config has the same hash and run id from every folder."""
    if path.is_absolute() and path.is_relative_to(REPO):
        rel = path.relative_to(REPO)
        if shipped(rel).resolve() == path.resolve():
            return str(rel)
    return str(path)


ShippedPath = Annotated[Path, AfterValidator(shipped), PlainSerializer(_portable, return_type=str, when_used="json")]


def _numeric(annotation) -> bool:
    return annotation in (int, float) or any(_numeric(a) for a in get_args(annotation))


def _float_or(value, default: float) -> float:
    try:
        return float(value)
    except (ValueError, OverflowError):
        return default


def _holds_bool(value) -> bool:
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, bool) or isinstance(value, list) and any(_holds_bool(v) for v in value)


class _Section(BaseModel):
    # allow_inf_nan=False: every float must be finite (a learning rate of .inf, a NaN beta)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v, info):
        """YAML `true` for a number would pass as 1 (1.0): refused. YAML ints for float fields stay fine."""
        if _holds_bool(v) and _numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError("must be a number, not true/false")
        return v

    @model_validator(mode="after")
    def _micro_divides(self):
        micro, batch = getattr(self, "micro_batch_size", None), getattr(self, "batch_size", None)
        if micro and batch % micro:
            raise ValueError(f"micro_batch_size ({micro}) must divide batch_size ({batch})")
        return self


class RunConfig(_Section):
    name: str = Field("flywheel", pattern=r"^[A-Za-z0-9_.-]+$")
    iterations: int = Field(2, ge=1, le=MAX_ITERATIONS, description="DPO iterations after M1: 2 gives M1 -> M2 -> M3.")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="Torch CPU threads; default: OMP_NUM_THREADS if set, else "
                                "the machine's cores. Does not change the run id.")


class RegistryConfig(_Section):
    root: Path = Path("data_registry")


class TinyModelConfig(_Section):
    """A Llama-architecture model built from scratch, with a byte-level BPE tokenizer trained on local text."""

    vocab_size: int = Field(2048, ge=300, le=262144)
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(256, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    max_position: int = Field(1024, ge=64, le=MAX_LENGTH)
    pretrain_steps: int = Field(300, ge=0, description="Causal-LM steps on the seed corpus: the PT model.")
    pretrain_lr: float = Field(3e-3, gt=0)
    pretrain_batch_size: int = Field(16, ge=1)
    corpus: Path | None = Field(None, description="Extra unlabeled text for pretraining (documents separated by a "
                                "blank line), added to the corpus made from the seeds.")
    split_digits: bool = Field(False, description="Tokenize every digit on its own (as Llama does): numbers keep "
                               "their digits, which arithmetic needs.")

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must be divisible by num_heads, and num_heads by num_kv_heads")
        return self


class ModelConfig(_Section):
    base: str = Field("tiny", description="'tiny' builds a model locally; a built-in name (`smollm2-135m-instruct`, "
                      "from an installed package); a .gguf file (converted once into the registry); a local "
                      "model folder; or a hub id. See flywheel/backends/bases.py.")
    tiny: TinyModelConfig = TinyModelConfig()


class LoraConfig(_Section):
    enabled: bool | Literal["auto"] = Field(
        "auto", description="Train LoRA adapters (peft), merged into the weights on save. 'auto': on for a real "
                            "(pretrained) base on CPU, off on GPU and for the tiny scratch model.")
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"

    def on(self, device: str, scratch: bool) -> bool:
        """Whether LoRA trains here: `enabled`, with 'auto' = a real base on CPU (`device` already resolved)."""
        return device == "cpu" and not scratch if self.enabled == "auto" else bool(self.enabled)

    def resolved(self, device: str, scratch: bool) -> "LoraConfig":
        """A copy with 'auto' decided (`on`), as training and stage keys need it."""
        return self.model_copy(update={"enabled": self.on(device, scratch)})


SeedFormat = Literal["auto", "flywheel", "oasst", "self_instruct", "alpaca", "chat"]


class SeedsConfig(_Section):
    path: ShippedPath = REPO / "seeds/demo.jsonl"
    format: SeedFormat = Field("auto", description="Seed file format; 'auto' decides from the file name and records.")
    eft: bool = Field(True, description="Add judge-training (EFT) examples to M1's SFT data.")
    max_chars: int = Field(20000, ge=1, le=1_000_000, description="The longest seed prompt or reply, in characters "
                           "(20000: about 5000 tokens); a longer one is refused before the run, naming its record. "
                           "Few-shot prompts hold several seeds, so one huge seed makes every one huge.")


class TrainerSection(_Section):
    """A trainer's settings. A trainer's name is a section of FlywheelConfig of this kind ('rs-sft' -> rs_sft): that
    is how `train.trainer` is checked, with no list of names to keep in step (flywheel/training/ holds the trainers)."""


class SFTConfig(TrainerSection):
    """M1 = SFT of the base model on the seed data (paper: lr 5.5e-6 -> 1.1e-6, batch 16)."""

    epochs: float = Field(3.0, gt=0, le=MAX_EPOCHS)
    learning_rate: float = Field(5.5e-6, gt=0)
    batch_size: int = Field(16, ge=1)
    micro_batch_size: int | None = Field(None, ge=1, description="Sequences per forward pass, accumulated to "
                                         "batch_size per step (a divisor of it): less activation memory, same "
                                         "steps. Default: batch_size.")
    max_length: int = Field(1024, ge=16, le=MAX_LENGTH)
    baseline_examples: int | None = Field(
        None, ge=1, description="train.trainer 'sft' (the plain-SFT baseline): seed examples trained on per iteration; "
                                "default 2 x self_instruct.num_prompts x dpo.epochs, the most sequences a DPO "
                                "iteration trains on (a chosen and a rejected one per pair and epoch).")
    baseline_learning_rate: float | None = Field(
        None, gt=0, description="train.trainer 'sft': its learning rate; default dpo.learning_rate, the rate the "
                                "iterations it stands in for train at.")
    lora: LoraConfig = LoraConfig()
    mode: Literal["full", "skip", "cold_start"] = Field(
        "full", description="M1: 'full' trains the base on the seeds' IFT (+ EFT) examples; 'skip' makes M1 the base "
                            "model itself (R1-Zero: RL straight from the base, with rule rewards); 'cold_start' "
                            "trains it on only the first `cold_start_examples` seed answers (IFT, no EFT) before RL.")
    cold_start_examples: int = Field(16, ge=1, description="sft.mode=cold_start: the seed chains M1 is trained on.")


class SelfInstructConfig(_Section):
    mode: Literal["auto", "chat", "completion"] = Field(
        "auto", description="'completion': the model continues a few-shot list (`template`), for base models; "
                            "'chat': the few-shot list goes in one user turn (`chat_template`), for instruct models. "
                            "'auto': completion for the tiny scratch model, chat for a real base.")
    template: ShippedPath = REPO / "prompts/self_instruct.txt"
    chat_template: ShippedPath = REPO / "prompts/self_instruct_chat.txt"
    num_prompts: int = Field(64, ge=1, le=1_000_000, description="Prompts to attempt per iteration (before filtering).")
    few_shot: int = Field(8, ge=1, le=64)
    temperature: float = Field(0.6, ge=0, description="0 is greedy: fine here, one reply per attempt.")
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int = Field(48, ge=1, le=MAX_NEW_TOKENS)
    min_words: int = Field(3, ge=1)
    max_words: int = Field(150, ge=1)
    dedup_threshold: float = Field(0.7, gt=0, le=1, description="ROUGE-L F at or above which a prompt is a near-duplicate.")
    seed_shots: int = Field(6, ge=0, description="Of the few_shot examples, how many are seed prompts (paper: 6 of 8); "
                            "the rest are earlier generated prompts, or seeds while there are none yet.")
    banned_keywords: list[str] = Field(
        default_factory=lambda: ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map",
                                 "maps", "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"],
        description="Drop prompts naming things a text model cannot see or make (Self-Instruct's list).")
    batch_size: int = Field(32, ge=1)
    prompts_file: Path | None = Field(
        None, description="Take each iteration's prompts from this JSON Lines file ({'prompt', 'reference'?}) "
                          "instead of generating them: num_prompts per iteration, none used twice in a run. A repeated "
                          "prompt counts once (with a warning); a file with fewer distinct prompts (not seeds) than "
                          "num_prompts x iterations is refused before the run.")


class SamplingSection(_Section):
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS)
    batch_size: int = Field(16, ge=1, description="Prompts per generate() call.")


class OpenAIBackendConfig(_Section):
    """Any OpenAI-compatible server (vLLM serve, SGLang, TGI, a hosted API, `flywheel serve`)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = Field(None, description="Served model name; default: the registered model's path.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (never logged).")
    max_concurrency: int = Field(8, ge=1)
    max_retries: int = Field(5, ge=0, description="Retries on 429, 5xx and timeouts, with exponential backoff.")
    backoff_s: float = Field(1.0, ge=0)
    timeout_s: float = Field(120.0, gt=0)


class VLLMBackendConfig(_Section):
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    dtype: str = "auto"
    max_model_len: int | None = Field(None, ge=16, le=MAX_LENGTH)


class RayConfig(_Section):
    """Ray (`generate.backend: ray`, `train.launch.mode: ray`): which cluster, and what each worker gets. Where work
    runs, not what it makes: none of it is in a stage id or the run id (flywheel/backends/ray_data.py)."""

    address: str | None = Field(
        None, description="The cluster to join ('127.0.0.1:6379', 'ray://host:10001', 'auto'); none: the "
                          "RAY_ADDRESS environment variable, else a local cluster started in this process.")
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="What each generation actor runs: the transformers engine (CPU or GPU), or "
                                    "vLLM (GPU nodes; generate.vllm's settings).")
    actors: int = Field(2, ge=1, description="Generation actors in the pool: batches run this many at a time.")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs each generation actor reserves; its torch threads.")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs each generation actor reserves (vLLM: its tensor "
                                                         "parallel size).")
    cpus_per_worker: float = Field(1.0, gt=0, description="train.launch.mode=ray: CPUs each Ray Train worker "
                                                          "reserves; its torch threads.")


class GenerateConfig(SamplingSection):
    backend: Literal["transformers", "vllm", "openai", "ray"] = Field(
        "transformers", description="transformers (this process), vllm (this process, CUDA), openai (a server fleet), "
                                    "ray (an actor pool on a Ray cluster: the `ray` section). Self-instruct and the "
                                    "judge use it too.")
    n: int = Field(4, ge=2, le=MAX_N, description="Candidates per prompt (paper: 4).")
    anchor_n: int | None = Field(
        None, ge=1, le=MAX_N, description="With `pairs.anchor: m1`: candidates per prompt sampled from the anchor "
                                          "model (M1) besides M_t's n, the rejected side of the pairs. Default: n.")
    openai: OpenAIBackendConfig = OpenAIBackendConfig()
    vllm: VLLMBackendConfig = VLLMBackendConfig()

    @model_validator(mode="after")
    def _greedy(self) -> "GenerateConfig":
        if self.temperature == 0:
            raise ValueError(f"generate.temperature=0 is greedy decoding, which gives generate.n={self.n} identical "
                             "candidates (transformers refuses it): set generate.temperature above 0 (paper: 0.7)")
        return self


class JudgeConfig(SamplingSection):
    template: ShippedPath = REPO / "prompts/judge.txt"
    mode: Literal["sample", "prob", "verify"] = Field(
        "sample", description="'sample': the paper's way, `samples` sampled verdicts parsed and averaged. 'prob': one "
                              "forward pass per candidate, the expected score over 0-5 from the next-token "
                              "probabilities after 'Score:' (transformers backend). 'verify': one yes/no question "
                              "per requirement of the prompt (`checklist`, `verify_template`), the score 5 x the mean "
                              "P(yes) (transformers backend).")
    verify_template: ShippedPath = Field(
        REPO / "prompts/verify.txt",
        description="verify mode: the yes/no question, with {instruction}, {response} and {requirement}.")
    checklist: str | None = Field(
        None, description="verify mode: 'module:function' taking (prompt, reference) and returning the prompt's "
                          "requirement texts (e.g. flywheel.analysis.ifworld:checklist); none: one generic "
                          "requirement.")
    samples: int = Field(3, ge=1, le=MAX_JUDGE_SAMPLES, description="Judge samples per candidate, averaged (paper: 3).")

    @model_validator(mode="after")
    def _greedy(self) -> "JudgeConfig":
        if self.mode == "sample" and self.samples > 1 and self.temperature == 0:
            raise ValueError(f"judge.temperature=0 is greedy decoding, which gives judge.samples={self.samples} "
                             "identical verdicts (transformers refuses it): set judge.temperature above 0 (paper: "
                             "0.7), or judge.samples=1")
        return self


class MetaJudgeConfig(SamplingSection):
    """Meta-Rewarding's meta-judge (Wu et al. 2024, arXiv 2407.19594): M_t compares the best- and worst-scored of its
    own judge samples of a candidate, in both orders (`template`); agreed verdicts are judge-preference pairs that DPO
    trains on beside the actor pairs, so the judge improves with the actor. Needs judge.mode=sample, judge.samples>=2."""

    enabled: bool = False
    template: ShippedPath = REPO / "prompts/meta_judge.txt"
    max_pairs: int | None = Field(None, ge=1, description="The most judge-preference pairs DPO trains on per "
                                  "iteration (a fixed pseudo-random subset); default: all.")


class RuleRewardConfig(_Section):
    """A rule-based reward for verifiable tasks, scored against the prompt's reference answer."""

    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    kind: Literal["exact", "regex", "python"]
    pattern: str | None = Field(None, description="regex: the answer is group 1 (or the whole match) of this pattern.")
    checker: str | None = Field(None, description="python: 'module:function' taking (prompt, response, reference) "
                                "and returning a float.")

    @model_validator(mode="after")
    def _needs(self) -> "RuleRewardConfig":
        if self.kind == "regex" and not self.pattern:
            raise ValueError("a regex rule needs 'pattern'")
        if self.kind == "python" and not self.checker:
            raise ValueError("a python rule needs 'checker' ('module:function')")
        return self


class RewardConfig(_Section):
    """Reward signals besides the judge, and how they are combined into the score that pairs are built from."""

    coherent: bool = Field(False, description="Compute the coherent reward log p_SFT(y|x) - log p_PT(y|x) (SRPPO).")
    normalize_by_length: bool = Field(False, description="Divide the coherent reward by the response's token count.")
    batch_size: int = Field(16, ge=1)
    rules: list[RuleRewardConfig] = Field(default_factory=list)
    weights: dict[str, float] = Field(
        default_factory=lambda: {"judge": 1.0},
        description="Signal -> weight: 'judge', 'coherent', or a rule's name. Each signal is z-scored within its "
                    "prompt, then summed with these weights; a single signal is used as it is. The judge stage runs "
                    "only when 'judge' is named here (weight 0: judged for the report, not used in pairs).")


class StepsConfig(_Section):
    """Process rewards: a candidate split into steps, each step scored, the scores aggregated (flywheel/stages/steps.py).
    Off (split 'none') by default. The aggregated scores are reward signals 'step_rule' and 'step_judge' (the
    reward stage writes them), usable in reward.weights like any other."""

    split: Literal["none", "line", "delimiter", "regex"] = Field(
        "none", description="How a candidate is split into steps: by non-empty line, by `delimiter`, or by the "
                            "regex `pattern` (re.split); 'none' turns process rewards off.")
    delimiter: str = Field("\n\n", min_length=1, description="split=delimiter: the text between two steps.")
    pattern: str | None = Field(None, description="split=regex: the separator between two steps, a regex.")
    max_steps: int = Field(32, ge=1, le=1024, description="A candidate with more steps keeps the first max_steps - 1 "
                           "and the rest joined as its last step (counted in the stage's stats).")
    rule: str | None = Field(None, description="The step-level rule: 'module:function' called as "
                             "function(prompt, reference, steps) -> one score per step (signal 'step_rule').")
    judge: bool = Field(False, description="The step-level self-judge: M_t gives a verdict on each step given the "
                        "steps before it (`judge_template`), parsed strictly (signal 'step_judge').")
    judge_template: ShippedPath = REPO / "prompts/step_judge.txt"
    judge_samples: int = Field(1, ge=1, le=MAX_JUDGE_SAMPLES, description="Verdicts per step, averaged.")
    judge_temperature: float = Field(0.7, ge=0)
    judge_max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    judge_batch_size: int = Field(32, ge=1)
    aggregate: Literal["min", "product", "mean"] = Field(
        "min", description="A candidate's step scores -> its outcome score (min: as PRM practice; product; mean).")
    credit: float = Field(0.0, ge=0, description="GRPO, RLOO and PPO: the weight of step rewards credited at each "
                          "step's last token, beside the sequence-level reward (0: off). Needs `rule`.")

    @model_validator(mode="after")
    def _needs(self) -> "StepsConfig":
        if self.split == "regex":
            if not self.pattern:
                raise ValueError("split=regex needs 'pattern'")
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"pattern {self.pattern!r} is not a valid regex: {e}") from None
        if self.rule is not None and not re.fullmatch(r"[\w.]+:\w+", self.rule):
            raise ValueError(f"rule {self.rule!r} is not of the form 'module:function'")
        if self.judge_samples > 1 and self.judge_temperature == 0:
            raise ValueError("judge_samples > 1 needs judge_temperature > 0 (greedy samples are all the same)")
        if self.split != "none" and not (self.rule or self.judge):
            raise ValueError(f"split={self.split} but no step reward: set rule ('module:function') or judge=true")
        if self.credit and not (self.rule and self.split != "none"):
            raise ValueError("credit > 0 needs split and rule: step credit in the online trainers is the step rule's "
                             "score of each step")
        return self

    @property
    def enabled(self) -> bool:
        return self.split != "none"

    def signals(self) -> list[str]:
        """The reward signals the step rewards add, in a fixed order."""
        if not self.enabled:
            return []
        return (["step_rule"] if self.rule else []) + (["step_judge"] if self.judge else [])


class PairsConfig(_Section):
    mode: Literal["outcome", "step"] = Field(
        "outcome", description="'outcome': per prompt the best vs the worst candidate by the combined score; 'step': "
                               "two candidates that share their first steps and part at one, chosen and rejected by "
                               "that step's reward (steps.split and a step signal weighted in reward.weights).")
    min_margin: float = Field(0.0, ge=0, description="Keep a pair only if chosen - rejected > min_margin (ties always dropped).")
    rho: float | list[float] = Field(
        0.0, description="Length control (Meta-Rewarding): 0 is plain best/worst; a list gives one value per iteration.")
    anchor: Literal["none", "m1"] = Field(
        "none", description="Temporal anchoring (Temporal Self-Rewarding's anchored rejection): 'm1' takes the "
                            "rejected answer from candidates of the past model M1 (generate.anchor_n per prompt) and "
                            "the chosen from M_t's, so chosen and rejected do not converge over iterations. Applies "
                            "from iteration 2 (in iteration 1 M_t is M1) when the iteration's trainer trains on pairs.")

    @field_validator("rho")
    @classmethod
    def _rho_range(cls, v):
        for r in v if isinstance(v, list) else [v]:
            if not 0 <= r <= 1:
                raise ValueError("each rho must be within [0, 1]")
        return v

    def rho_for(self, iteration: int) -> float:
        return per_iteration(self.rho, iteration)


class DPOConfig(TrainerSection):
    """DPO through TRL (paper: beta 0.1, lr 1e-6 -> 1e-7, batch 16, dropout 0.1)."""

    beta: float = Field(0.1, gt=0)
    learning_rate: float = Field(1e-6, gt=0)
    min_lr_ratio: float = Field(0.1, gt=0, le=1, description="The learning rate decays (cosine) to this fraction.")
    epochs: float = Field(1.0, gt=0, le=MAX_EPOCHS)
    batch_size: int = Field(16, ge=1)
    micro_batch_size: int | None = Field(None, ge=1, description="Pairs per forward pass, accumulated to "
                                         "batch_size per step (a divisor of it): less activation memory, same "
                                         "steps. Default: batch_size.")
    max_length: int = Field(1024, ge=16, le=MAX_LENGTH)
    dropout: float = Field(0.1, ge=0, lt=1)
    reference: Literal["previous", "m1"] = Field(
        "previous", description="Reference model: M_t (the model being trained from) or M1 throughout.")
    nll_weight: float = Field(0.0, ge=0, description="Add this weight x the chosen response's NLL to the DPO loss "
                              "(Iterative RPO; 1.0 in that paper). 0 is plain DPO, as Self-Rewarding LMs.")
    lora: LoraConfig = LoraConfig()
    precompute_ref_log_probs: bool | Literal["auto"] = Field(
        "auto", description="Compute the reference model's log-probs once per dataset before training (TRL), so no "
                            "second model stays resident. 'auto': on for a real base, off for the tiny scratch model.")

    def precompute(self, scratch: bool) -> bool:
        """Whether the reference log-probs are precomputed, 'auto' decided."""
        return not scratch if self.precompute_ref_log_probs == "auto" else self.precompute_ref_log_probs


class PPOConfig(TrainerSection):
    """PPO with the coherent reward, as SRPPO: policy and reference from M_t, a value head, GAE, clipped surrogate."""

    steps: int = Field(20, ge=1, description="PPO rollouts (each: sample, score, then ppo_epochs of updates).")
    rollout_batch_size: int = Field(16, ge=1)
    minibatch_size: int = Field(8, ge=1)
    ppo_epochs: int = Field(2, ge=1)
    learning_rate: float = Field(1e-6, gt=0)
    value_learning_rate: float | None = Field(None, gt=0, description="Default: learning_rate.")
    kl_coef: float = Field(0.05, ge=0)
    clip_range: float = Field(0.2, gt=0)
    clip_range_value: float = Field(0.2, gt=0)
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, gt=0, le=1)
    whiten_rewards: bool = True
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS)
    max_grad_norm: float = Field(1.0, gt=0)


class OnlineRLConfig(TrainerSection):
    """GRPO / RLOO through TRL, with the coherent and rule rewards as reward functions."""

    learning_rate: float = Field(1e-6, gt=0)
    num_generations: int = Field(4, ge=2, le=MAX_N)
    batch_size: int = Field(8, ge=1, description="Completions per step (a multiple of num_generations).")
    max_steps: int = Field(20, ge=1)
    beta: float = Field(0.04, ge=0, description="KL coefficient against the reference model.")
    temperature: float = Field(0.7, gt=0)
    max_completion_length: int = Field(256, ge=1, le=MAX_NEW_TOKENS)


class RSSFTConfig(TrainerSection):
    """Rejection-sampling fine-tuning: the best of the N candidates by the combined reward, then SFT."""

    epochs: float = Field(1.0, gt=0, le=MAX_EPOCHS)
    learning_rate: float = Field(5.5e-6, gt=0)
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(1024, ge=16, le=MAX_LENGTH)
    min_score: float | None = Field(None, description="Keep a best candidate only if its combined score is at least this.")


class LaunchConfig(_Section):
    """Where training runs: in this process, or as a separate `accelerate launch` process (frees GPU memory)."""

    mode: Literal["inprocess", "accelerate", "ray"] = Field(
        "inprocess", description="inprocess; accelerate (an `accelerate launch` child); ray (a Ray Train job of "
                                 "num_processes workers on the cluster of the `ray` section).")
    num_processes: int = Field(1, ge=1, description="Training processes in all (mode ray: Ray Train workers).")
    num_machines: int = Field(1, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    deepspeed_config: ShippedPath | None = Field(None, description="A DeepSpeed ZeRO JSON (see configs/deepspeed/).")


class TrainConfig(_Section):
    trainer: str | list[str] = Field("dpo", description="One trainer, or a list with one per iteration: dpo, ppo, grpo, "
                                                      "rloo, rs-sft, sft (flywheel/training/).")
    launch: LaunchConfig = LaunchConfig()
    report_to: Literal["none", "tensorboard", "mlflow", "wandb", "trackio"] = Field(
        "none", description="Experiment tracker (TRL/transformers' `report_to`) for the trainers' own metrics and "
                            "each iteration's report figures (flywheel/tracking.py); `none` stays offline. "
                            "Does not change the run id.")

    def trainer_for(self, iteration: int) -> str:
        return per_iteration(self.trainer, iteration)


class FlywheelConfig(_Section):
    run: RunConfig = RunConfig()
    registry: RegistryConfig = RegistryConfig()
    model: ModelConfig = ModelConfig()
    seeds: SeedsConfig = SeedsConfig()
    sft: SFTConfig = SFTConfig()
    self_instruct: SelfInstructConfig = SelfInstructConfig()
    generate: GenerateConfig = GenerateConfig()
    judge: JudgeConfig = JudgeConfig()
    meta_judge: MetaJudgeConfig = MetaJudgeConfig()
    reward: RewardConfig = RewardConfig()
    steps: StepsConfig = StepsConfig()
    pairs: PairsConfig = PairsConfig()
    train: TrainConfig = TrainConfig()
    dpo: DPOConfig = DPOConfig()
    ppo: PPOConfig = PPOConfig()
    grpo: OnlineRLConfig = OnlineRLConfig()
    rloo: OnlineRLConfig = OnlineRLConfig()
    rs_sft: RSSFTConfig = RSSFTConfig()
    monitors: MonitorsConfig = MonitorsConfig()
    ray: RayConfig = RayConfig()

    @field_validator("monitors", mode="before")
    @classmethod
    def _monitor_numbers(cls, v):
        """`monitors` is not a _Section (flywheel/analysis/monitors.py): the same rules for its numbers, here."""
        for name, value in v.items() if isinstance(v, dict) else ():
            field = MonitorsConfig.model_fields.get(name)
            if not field or not _numeric(field.annotation):
                continue
            if isinstance(value, bool):
                raise ValueError(f"{name} must be a number, not true/false")
            if isinstance(value, (int, float, str)) and not math.isfinite(_float_or(value, 0.0)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        return v

    @model_validator(mode="after")
    def _trainers_known(self) -> "FlywheelConfig":
        names = [self.train.trainer] if isinstance(self.train.trainer, str) else self.train.trainer
        known = sorted(k.replace("_", "-") for k, v in self if isinstance(v, TrainerSection))
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise ValueError(f"train.trainer: unknown trainer(s) {unknown or names}; known: {known}")
        return self

    @model_validator(mode="after")
    def _signals_known(self) -> "FlywheelConfig":
        known = {"judge", "coherent", *(r.name for r in self.reward.rules), *self.steps.signals()}
        unknown = sorted(set(self.reward.weights) - known)
        if unknown:
            steps = [u for u in unknown if u in ("step_rule", "step_judge")]
            hint = (f"; {steps[0]} needs steps.split and steps.{'rule' if steps[0] == 'step_rule' else 'judge'}"
                    if steps else "")
            raise ValueError(f"reward.weights names unknown signal(s) {unknown}; known: {sorted(known)}{hint}")
        if self.reward.weights.get("coherent") and not self.reward.coherent:
            raise ValueError("reward.weights gives 'coherent' a weight but reward.coherent is false")
        if not any(self.reward.weights.values()):
            raise ValueError("reward.weights: at least one signal needs a non-zero weight")
        return self

    @model_validator(mode="after")
    def _step_pairs_need(self) -> "FlywheelConfig":
        """Step-wise pairs are chosen by a step signal; anchoring and length bands are outcome-pair selections."""
        if self.pairs.mode != "step":
            return self
        if not any(self.reward.weights.get(s) for s in self.steps.signals()):
            raise ValueError("pairs.mode=step chooses by the step rewards: set steps.split and steps.rule (or "
                             "steps.judge), and give step_rule (or step_judge) a weight in reward.weights")
        if self.pairs.anchor != "none" or any(self.pairs.rho if isinstance(self.pairs.rho, list) else [self.pairs.rho]):
            raise ValueError("pairs.mode=step takes neither pairs.anchor nor pairs.rho (they select outcome pairs)")
        return self

    @model_validator(mode="after")
    def _anchor_n_needs_anchor(self) -> "FlywheelConfig":
        """generate.anchor_n samples the anchor model: without an anchor it would be silently ignored."""
        if self.generate.anchor_n is not None and self.pairs.anchor == "none":
            raise ValueError(f"generate.anchor_n={self.generate.anchor_n} samples the anchor model's candidates, but "
                             "pairs.anchor is 'none': set pairs.anchor=m1, or leave generate.anchor_n unset")
        return self

    @model_validator(mode="after")
    def _meta_judge_needs(self) -> "FlywheelConfig":
        """The meta-judge compares several sampled judgments of one candidate: refused without them."""
        if not self.meta_judge.enabled:
            return self
        if self.judge.mode != "sample" or self.judge.samples < 2:
            raise ValueError(f"meta_judge.enabled needs judge.mode=sample and judge.samples >= 2, several judgment "
                             f"texts per candidate to compare (got judge.mode={self.judge.mode}, "
                             f"judge.samples={self.judge.samples})")
        if "judge" not in self.reward.weights:
            raise ValueError("meta_judge.enabled needs the judge stage, which runs only when reward.weights names "
                             "'judge'")
        return self

    @property
    def scratch(self) -> bool:
        """The base is the tiny model built from scratch here (not a pretrained one)."""
        return self.model.base == "tiny"

    def config_hash(self) -> str:
        return content_hash(self.model_dump(mode="json"))


def per_iteration(value, iteration: int):
    """A setting that is one value, or a list with one value per iteration (1-based; the last repeats)."""
    if isinstance(value, list):
        return value[min(iteration, len(value)) - 1]
    return value


def content_hash(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of obj, shortened. The one hash used for every key in the registry."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def apply_override(data: dict, item: str) -> None:
    """Apply one `a.b=c` override to a nested dict; the value is parsed as YAML (so 3, 0.5, true, [1,2] work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. generate.n=8)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key (not a field of this section)" if e["type"] == "extra_forbidden" else e["msg"]
        msg = msg.removeprefix("Value error, ")
        got = "" if e["type"] == "extra_forbidden" or not e["loc"] or isinstance(e["input"], dict) else f", got {e['input']!r}"
        lines.append(f"  {field}: {msg}{got}")
    return "invalid config:\n" + "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> FlywheelConfig:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
    for item in overrides:
        apply_override(data, item)
    try:
        return FlywheelConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None


def check_template(text: str, setting: str, path, fields: tuple[str, ...]) -> None:
    """Refuse a prompt template that its stage cannot fill with `str.format(**fields)`, before any work: a stray brace,
    a field the stage does not fill in (FastChat's {question}, literal JSON braces, positional {}), a conversion or
    format spec, or one of `fields` missing (the model would never see it). The message names the setting, the file,
    the line and the field."""
    escape = "write a literal brace as {{ or }}"
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        stray = next((m for m in re.finditer(r"\{\{|\}\}|\{[^{}]*\}|[{}]", text) if len(m.group()) == 1), None)
        where = f" line {text.count(chr(10), 0, stray.start()) + 1}" if stray else ""
        raise ConfigError(f"{setting}: {path}{where}: a stray brace ({e}); {escape}") from None
    allowed = ", ".join(f"{{{f}}}" for f in fields)
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        field = f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
        if name not in fields or spec or conversion:
            line = text.count("\n", 0, max(text.find(field), 0)) + 1
            raise ConfigError(f"{setting}: {path} line {line}: the field {field} is not one this stage fills in "
                              f"(it fills {allowed}); {escape}")
    found = {name for _, name, _, _ in parsed}
    missing = [f for f in fields if f not in found]
    if missing:
        raise ConfigError(f"{setting}: {path} has no {{{missing[0]}}} field, so the model would never see it; "
                          f"the template needs {allowed}")
