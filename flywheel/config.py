"""One pydantic model for the whole run, loaded from YAML with `a.b=c` overrides.

    cfg = load_config("configs/demo.yaml", ["generate.n=8", "run.iterations=3"])

Every section forbids unknown keys, so a typo fails loudly. `load_config` raises `ConfigError`, whose message names each
bad field (`generate.n: Input should be a valid integer, got 'x'`); the CLI prints it and exits 2 without a traceback.
Defaults are the papers' numbers for real models (see ../shared/METHOD.md); `configs/demo.yaml` overrides what a tiny
CPU model needs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message is written for a person and names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    name: str = Field("flywheel", pattern=r"^[A-Za-z0-9_.-]+$")
    iterations: int = Field(2, ge=1, description="DPO iterations after M1: 2 gives M1 -> M2 -> M3.")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


class RegistryConfig(_Section):
    root: Path = Path("data_registry")


class TinyModelConfig(_Section):
    """A Llama-architecture model built from scratch, with a byte-level BPE tokenizer trained on local text."""

    vocab_size: int = Field(2048, ge=300)
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(256, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    max_position: int = Field(1024, ge=64)
    pretrain_steps: int = Field(300, ge=0, description="Causal-LM steps on the seed corpus: the PT model.")
    pretrain_lr: float = Field(3e-3, gt=0)
    pretrain_batch_size: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must be divisible by num_heads, and num_heads by num_kv_heads")
        return self


class ModelConfig(_Section):
    base: str = Field("tiny", description="'tiny' builds a model locally; otherwise a local path or hub id.")
    tiny: TinyModelConfig = TinyModelConfig()


class SeedsConfig(_Section):
    path: Path = Path("seeds/demo.jsonl")
    eft: bool = Field(True, description="Add judge-training (EFT) examples built from the seeds to M1's SFT data.")


class SFTConfig(_Section):
    """M1 = SFT of the base model on the seed data (paper: lr 5.5e-6 -> 1.1e-6, batch 16)."""

    epochs: float = Field(3.0, gt=0)
    learning_rate: float = Field(5.5e-6, gt=0)
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(1024, ge=16)


class SelfInstructConfig(_Section):
    template: Path = Path("prompts/self_instruct.txt")
    num_prompts: int = Field(64, ge=1, description="Prompts to attempt per iteration (before filtering).")
    few_shot: int = Field(8, ge=1)
    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int = Field(48, ge=1)
    min_words: int = Field(3, ge=1)
    max_words: int = Field(150, ge=1)
    dedup_threshold: float = Field(0.7, gt=0, le=1, description="ROUGE-L F at or above which a prompt is a near-duplicate.")
    batch_size: int = Field(32, ge=1)


class SamplingSection(_Section):
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(16, ge=1, description="Prompts per generate() call.")


class GenerateConfig(SamplingSection):
    backend: Literal["transformers"] = "transformers"
    n: int = Field(4, ge=2, description="Candidates per prompt (paper: 4).")


class JudgeConfig(SamplingSection):
    template: Path = Path("prompts/judge.txt")
    samples: int = Field(3, ge=1, description="Judge samples per candidate, averaged (paper: 3).")


class PairsConfig(_Section):
    min_margin: float = Field(0.0, ge=0, description="Keep a pair only if chosen - rejected > min_margin (ties always dropped).")


class DPOConfig(_Section):
    """DPO through TRL (paper: beta 0.1, lr 1e-6 -> 1e-7, batch 16)."""

    beta: float = Field(0.1, gt=0)
    learning_rate: float = Field(1e-6, gt=0)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(1024, ge=16)


class FlywheelConfig(_Section):
    run: RunConfig = RunConfig()
    registry: RegistryConfig = RegistryConfig()
    model: ModelConfig = ModelConfig()
    seeds: SeedsConfig = SeedsConfig()
    sft: SFTConfig = SFTConfig()
    self_instruct: SelfInstructConfig = SelfInstructConfig()
    generate: GenerateConfig = GenerateConfig()
    judge: JudgeConfig = JudgeConfig()
    pairs: PairsConfig = PairsConfig()
    dpo: DPOConfig = DPOConfig()

    def config_hash(self) -> str:
        return content_hash(self.model_dump(mode="json"))


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
        got = "" if e["type"] == "extra_forbidden" else f", got {e['input']!r}"
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
