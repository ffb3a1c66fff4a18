"""Random kills spread over stages: SIGKILL a real run inside each stage, resume it, compare with an uninterrupted run.

    python bench/kill_harness.py                  # 20 kills, every stage at least twice
    python bench/kill_harness.py --kills 40 --seed 3
    python bench/kill_harness.py --smoke          # 3 kills: generate, reward, dpo (tests/test_kill_harness.py)

The run is the tiny one of tests/test_kill_resume.py (`tests.helpers.models.tiny_overrides`: one iteration, the
coherent reward, so every stage runs: seeds, base, sft, self_instruct, generate, judge, reward, pairs, dpo), without
Prefect (`flywheel.pipeline.run`), each time in a subprocess, always at the same registry path (configs and the config
hashes rows record are then identical).

1. The reference run: uninterrupted; a copy of its registry is taken after each stage, and each stage's ledger window
   (stage_runs.started_at -> finished_at) and its offset from the moment the pipeline called the stage are recorded.
2. The targets: the stages in a shuffled round, round after round, so every stage is hit as often as the others (a
   stage of 0.2 s as often as one of 8 s: kill points are spread over stages, not over wall time); each with a
   fraction u, uniform in (0, 1).
3. Calibration (not with --smoke): each target stage run once the way a kill's run runs it (a fresh process started
   from the registry just before the stage: imports and model loads make it slower than in the reference) and
   stopped after it; its ledger window there is what the kills aim at.
4. Each kill: the registry is reset to the reference's copy from just before the target stage (an empty one for
   seeds), the run starts in its own process group, and when it says on stderr that it called the stage, the harness
   waits until u x the window into the stage's ledger row and SIGKILLs the whole group. Where the kill landed is read
   from the ledger (the stage_runs row left 'running'; on a copy, so the killed registry is resumed untouched) and
   from the run's log (the stage's last committed batch). A plain run resumes it, and the registry is compared with
   the reference's (tests/helpers/compare.py): every table less timestamps and timings, each model's weights byte
   for byte, every dataset version's file against its registered sha256, no duplicate keys, every model folder
   complete.

The flywheel source is copied into the work folder first and every process (this one included) runs that copy, so
edits to the working tree during a long bench do not mix two versions of the code (`--in-place` runs the tree as
it is). Prints a table per stage and one per kill, writes the whole record as JSON (--json), and exits 1 when a
resumed run differs from the reference or could not be killed or resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # flywheel, flows and tests.helpers of this tree (the frozen copy's, in one)
# _common sets the environment and chdirs to the tree's root
from _common import machine, print_table

REPO = HERE.parent
SMOKE_STAGES = ["generate", "reward", "dpo"]  # generation, scoring, training: the cheapest three to resume
FROZEN_ENV = "FLYWHEEL_KILL_HARNESS_FROZEN"  # set in the copy: "<original command>\t<workdir to remove or ''>"
CODE = ["flywheel", "flows", "bench", "prompts", "seeds", "configs", "tests/helpers", "tests/__init__.py",
        "tests/small.yaml"]


# --- the child: one run of the pipeline, saying on stderr when it calls and ends each stage -------------------------

def child(config: str | None, overrides: list[str], snapshots: Path | None) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    from flywheel import pipeline
    from flywheel.config import load_config

    cfg = load_config(config, overrides)
    root, done = Path(cfg.registry.root), 0

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def call(step, ctx, state):
        nonlocal done
        say(f"stage start: {step.name} {ctx.iteration} {time.time():.6f}")
        t0 = time.perf_counter()
        state = pipeline.call_here(step, ctx, state)
        say(f"stage done: {step.name} {ctx.iteration} {time.time():.6f} {time.perf_counter() - t0:.3f}")
        if snapshots is not None:  # the registry right after this stage, for the kills that start after it
            shutil.copytree(root, snapshots / f"{done:02d}-{label(ctx.iteration, step.name)}")
        done += 1
        return state

    run_id = pipeline.run(cfg, call=call)
    say(f"run done: {run_id}")


def label(iteration: int, stage: str) -> str:
    """A stage's name in the tables: `sft` (iteration 0), `generate@1` (iteration 1; `generate` alone when the run has
    one iteration: see StageTiming.name)."""
    return stage if iteration == 0 else f"{stage}@{iteration}"


MARK = re.compile(r"stage (start|done): (\S+) (\d+) ([\d.]+)")
BATCH = re.compile(r"(\w+): committed batch (\d+/\d+)")


class Child:
    """The child run as a process in its own group, its stderr read line by line by a thread (timestamped by the
    child), so it never blocks on a full pipe."""

    def __init__(self, args: argparse.Namespace, snapshots: Path | None = None):
        spec = {"config": args.config, "overrides": args.run_overrides,
                "snapshots": str(snapshots) if snapshots else None}
        cmd = [sys.executable, str(HERE / "kill_harness.py"), "--child", json.dumps(spec)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.lines: list[str] = []
        self.marks: dict[tuple[str, int, str], float] = {}  # ("start" | "done", iteration, stage) -> the child's clock
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.timer = threading.Timer(args.child_timeout, self.kill)  # a child that hangs must not hang the bench
        self.timer.start()

    def _read(self) -> None:
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            with self.cond:
                self.lines.append(line)
                m = MARK.search(line)
                if m:
                    self.marks[(m.group(1), int(m.group(3)), m.group(2))] = float(m.group(4))
                self.cond.notify_all()
        with self.cond:
            self.lines.append("<eof>")
            self.cond.notify_all()

    def wait_for(self, mark: str, iteration: int, stage: str) -> float | None:
        """The child's clock when it called ("start") or ended ("done") that stage; None if it ended first."""
        key = (mark, iteration, stage)
        with self.cond:
            self.cond.wait_for(lambda: key in self.marks or (self.lines and self.lines[-1] == "<eof>"))
            return self.marks.get(key)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the whole group: any process the run started dies with it
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        rc = self.proc.wait()
        self.reader.join(timeout=30)
        self.timer.cancel()
        self.kill()  # what may be left of its group
        return rc

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(self.lines) + "\n")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])


# --- the plan: the reference's stages, their windows, the kills -----------------------------------------------------

@dataclass
class StageTiming:
    index: int           # position in the run (0: seeds)
    iteration: int
    stage: str
    name: str            # as printed
    call_s: float        # the pipeline's call of the stage, as the child timed it
    offset_s: float      # from that call to the ledger row 'running' (stage_runs.started_at)
    window_s: float      # the ledger row's life: started_at -> finished_at
    cold_offset_s: float | None = None  # the same two in a run started from the registry just before the stage (a
    cold_window_s: float | None = None  # fresh process, as a kill's run is): what the kills aim at when measured
    batches: int = 0     # the batches it commits one by one (flywheel.stage.pending_batches), as the log says; 0: none

    def aim(self, u: float) -> float:
        """Seconds after the stage's call at which a kill lands at fraction u of its ledger window."""
        if self.cold_window_s is not None:
            return self.cold_offset_s + u * self.cold_window_s
        return self.offset_s + u * self.window_s


@dataclass
class Kill:
    n: int
    target: str
    u: float
    delay_s: float = 0.0           # after the child called the target stage
    late_s: float = 0.0            # how late the signal went out (the harness saw the call after that)
    killed: bool = False           # the child died of our SIGKILL (not before)
    landed: str = "-"              # the stage whose ledger row was 'running' at the kill ("-" : none)
    landed_detail: str = ""        # its last committed batch, or where between stages
    running_rows: list = field(default_factory=list)
    leftovers_at_kill: list = field(default_factory=list)
    resume_rc: int | None = None
    resume_s: float = 0.0
    leftovers: list = field(default_factory=list)   # temp files still there after the resume
    differences: list = field(default_factory=list)
    error: str = ""
    extra: bool = False            # a kill added because no planned kill landed in its target (--cover)

    @property
    def matched(self) -> bool:
        """Resumed (or finished unkilled) with a registry equal to the reference's."""
        return self.resume_rc == 0 and not self.differences and not self.error


def reference_run(args: argparse.Namespace, registry: Path, snapshots: Path) -> tuple[list[StageTiming], float]:
    from flywheel.registry import Registry

    shutil.rmtree(registry, ignore_errors=True)
    shutil.rmtree(snapshots, ignore_errors=True)
    snapshots.mkdir(parents=True)
    t0 = time.perf_counter()
    ref = Child(args, snapshots)
    rc = ref.wait()
    wall = time.perf_counter() - t0
    if rc != 0 or not any(line.startswith("run done") for line in ref.lines):
        sys.exit(f"the reference run failed (rc {rc}):\n{ref.tail()}")
    shutil.copytree(registry, snapshots / "final")
    calls = []
    for line in ref.lines:
        m = MARK.search(line)
        if m and m.group(1) == "done":
            calls.append((int(m.group(3)), m.group(2), float(line.split()[-1])))
    with Registry(snapshots / "final") as reg:
        ledger = {(r["iteration"], r["stage"]): r for r in reg.rows(
            "SELECT iteration, stage, status, started_at, finished_at FROM stage_runs")}
    iterations = {t for t, _, _ in calls if t > 0}
    out = []
    for i, (t, stage, call_s) in enumerate(calls):
        row = ledger[(t, stage)]
        assert row["status"] == "done", row
        start = ref.marks[("start", t, stage)]
        name = stage if t == 0 or len(iterations) == 1 else label(t, stage)
        batches = [m.group(2) for m in map(BATCH.search, ref.lines) if m and m.group(1) == stage]
        out.append(StageTiming(i, t, stage, name, call_s, row["started_at"].timestamp() - start,
                               (row["finished_at"] - row["started_at"]).total_seconds(),
                               batches=int(batches[-1].split("/")[1]) if batches else 0))
    return out, wall


def plan_kills(stages: list[StageTiming], kills: int, seed: int, only: list[str] | None,
               u_range: tuple[float, float]) -> list[tuple[StageTiming, float]]:
    """`kills` (target, u): the targets in shuffled rounds over all stages (or `only`), u uniform in u_range."""
    rng = random.Random(seed)
    pool = [s for s in stages if not only or s.name in only or s.stage in only]
    if only and len(pool) < len(only):
        sys.exit(f"--stages: no such stage among {', '.join(s.name for s in stages)}")
    targets: list[StageTiming] = []
    while len(targets) < kills:
        targets += rng.sample(pool, len(pool))
    return [(s, rng.uniform(*u_range)) for s in targets[:kills]]


def fork(target: StageTiming, registry: Path, snapshots: Path) -> None:
    """The registry as the reference left it just before `target` (none before the first stage)."""
    shutil.rmtree(registry, ignore_errors=True)
    before = [p for p in snapshots.iterdir() if p.name[:2].isdigit() and int(p.name[:2]) == target.index - 1]
    if before:
        shutil.copytree(before[0], registry)


def ledger_copy(registry: Path, sql: str) -> tuple[list[dict], list[str]]:
    """Rows of `sql` and the leftover temp files, read on a copy of the registry: opening a killed registry would
    replay its WAL before the resume does."""
    from flywheel.registry import Registry
    from tests.helpers.compare import leftovers

    probe = registry.parent / "at-kill"
    shutil.rmtree(probe, ignore_errors=True)
    shutil.copytree(registry, probe)
    try:
        with Registry(probe) as reg:
            return reg.rows(sql), leftovers(probe)
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def calibrate(args, targets: list[StageTiming], registry: Path, snapshots: Path) -> None:
    """Each target stage's ledger window as a kill's run sees it: a run started from the registry just before the
    stage, in a fresh process (imports, model loads), stopped once the stage is done."""
    for s in targets:
        fork(s, registry, snapshots)
        run = Child(args)
        called = run.wait_for("start", s.iteration, s.stage)
        done = run.wait_for("done", s.iteration, s.stage)
        run.kill()
        run.wait()
        if called is None or done is None:
            sys.exit(f"the calibration run of {s.name} ended before the stage did:\n{run.tail()}")
        rows, _ = ledger_copy(registry, "SELECT started_at, finished_at FROM stage_runs WHERE iteration = "
                                        f"{s.iteration} AND stage = '{s.stage}'")
        s.cold_offset_s = rows[0]["started_at"].timestamp() - called
        s.cold_window_s = (rows[0]["finished_at"] - rows[0]["started_at"]).total_seconds()
        print(f"calibrated {s.name}: ledger window {s.cold_window_s:.2f} s in a fresh run "
              f"(reference {s.window_s:.2f} s)", file=sys.stderr, flush=True)


def where(running: list[tuple[int, str]], ledger: dict[tuple[int, str], str], lines: list[str],
          stages: dict[tuple[int, str], StageTiming]) -> tuple[str, str]:
    """(landed, detail) of a kill: the stage whose ledger row it left 'running' ("-" when none) and how far that stage
    got (its last committed batch); or, with no row running, where the run was between ledger rows."""
    if running:
        t, stage = running[-1]
        known = stages.get((t, stage))
        batches = [m.group(2) for m in map(BATCH.search, lines) if m and m.group(1) == stage]
        if batches:
            return known.name if known else label(t, stage), f"after batch {batches[-1]}"
        if known and known.batches:
            return known.name, f"before its first batch of {known.batches}"
        return known.name if known else label(t, stage), "running"
    marks = [(m.group(1), int(m.group(3)), m.group(2)) for m in map(MARK.search, lines) if m]
    if not marks:
        return "-", "before the pipeline called a stage"
    mark, t, stage = marks[-1]
    name = stages[(t, stage)].name if (t, stage) in stages else label(t, stage)
    if mark == "done":
        return "-", f"between stages, after {name}"
    if (t, stage) not in ledger:
        return "-", f"{name} called, its ledger row not written yet"
    return "-", f"{name} called, its ledger row already '{ledger[(t, stage)]}'"


# --- one kill -------------------------------------------------------------------------------------------------------

def kill_once(args, n: int, target: StageTiming, u: float, stages: list[StageTiming], registry: Path,
              snapshots: Path) -> Kill:
    """Kill a run at fraction u of `target`'s window, resume it, compare. The runs' stderr go to <work>/logs."""
    from tests.helpers.compare import differences, leftovers

    logs = registry.parent / "logs"
    k = Kill(n, target.name, round(u, 4))
    fork(target, registry, snapshots)
    k.delay_s = round(target.aim(u), 4)

    run = Child(args)
    called = run.wait_for("start", target.iteration, target.stage)
    if called is None:
        rc = run.wait()
        k.error = f"the run ended (rc {rc}) before it called {target.name}:\n{run.tail()}"
        return k
    pause = called + k.delay_s - time.time()
    if pause > 0:
        time.sleep(pause)
    k.late_s = round(max(0.0, -pause), 4)
    run.kill()
    rc = run.wait()
    run.save(logs / f"kill-{n:02d}.log")
    k.killed = rc == -signal.SIGKILL
    if rc == 0 and any(line.startswith("run done") for line in run.lines):  # it went faster than aimed at: no kill
        k.landed_detail, k.resume_rc = "none: the run had finished", 0  # nothing to resume; still compared
        k.differences = [str(d) for d in differences(registry, snapshots / "final")]
        return k
    if not k.killed:
        k.error = f"the run was not killed by the harness (rc {rc}):\n{run.tail()}"
        return k

    # Where it landed: the ledger row left 'running' (read on a copy), and the stage's last committed batch.
    rows, k.leftovers_at_kill = ledger_copy(
        registry, "SELECT iteration, stage, status FROM stage_runs ORDER BY started_at")
    k.running_rows = [(r["iteration"], r["stage"]) for r in rows if r["status"] == "running"]
    k.landed, k.landed_detail = where(k.running_rows, {(r["iteration"], r["stage"]): r["status"] for r in rows},
                                      run.lines, {(s.iteration, s.stage): s for s in stages})

    # Resume with a plain run, then compare.
    t0 = time.perf_counter()
    resumed = Child(args)
    k.resume_rc = resumed.wait()
    k.resume_s = round(time.perf_counter() - t0, 2)
    resumed.save(logs / f"kill-{n:02d}-resume.log")
    if k.resume_rc != 0 or not any(line.startswith("run done") for line in resumed.lines):
        k.error = f"the resume failed (rc {k.resume_rc}):\n{resumed.tail()}"
        return k
    k.differences = [str(d) for d in differences(registry, snapshots / "final")]
    k.leftovers = leftovers(registry)
    return k


# --- the bench ------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=None, help="number of kills (default 20; 3 with --smoke)")
    p.add_argument("--seed", type=int, default=0, help="seed of the targets' order and of the fractions u")
    p.add_argument("--smoke", action="store_true", help=f"3 kills, one on each of {', '.join(SMOKE_STAGES)}, "
                                                        "u in (0.2, 0.6) of the reference's windows")
    p.add_argument("--stages", nargs="+", default=None, metavar="STAGE", help="target only these stages")
    p.add_argument("--u-range", nargs=2, type=float, default=None, metavar=("LO", "HI"),
                   help="the fraction u of the stage's window the kill lands at (default 0 1; 0.2 0.6 with --smoke)")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="measure each target stage's ledger window in a run started just before it, as the kills' "
                        "runs are, and aim at that (default: yes; no with --smoke, which aims at the reference's)")
    p.add_argument("--cover", type=int, default=None,
                   help="extra kills (at most) per target stage no kill landed in (default 3; 0 with --smoke)")
    p.add_argument("--iterations", type=int, default=1, help="flywheel iterations of the run (default 1)")
    p.add_argument("--config", default=None, help="a flywheel config under the tiny overrides (default: none, as "
                                                  "tests/test_kill_resume.py)")
    p.add_argument("--workdir", type=Path, default=None, help="where the registry, its copies and the code copy "
                                                              "live (default: a temporary folder, removed at exit)")
    p.add_argument("--json", type=Path, default=None, help="the record (default bench/results/kill_harness.json; "
                                                           "kill_harness-smoke.json with --smoke)")
    p.add_argument("--child-timeout", type=float, default=900, help="seconds before a run is killed as hung")
    p.add_argument("--in-place", action="store_true", help="run the working tree's code, not a copy of it")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="more config overrides")
    args = p.parse_args(argv)
    if args.kills is None:
        args.kills = 3 if args.smoke else 20
    if args.u_range is None:
        args.u_range = [0.2, 0.6] if args.smoke else [0.0, 1.0]
    if args.stages is None and args.smoke:
        args.stages = SMOKE_STAGES
    if args.calibrate is None:
        args.calibrate = not args.smoke
    if args.cover is None:
        args.cover = 0 if args.smoke else 3
    return args


def freeze_code(work: Path, original: Path) -> Path:
    """A copy of the code every process of the bench runs (see the module's doc)."""
    src = work / "src"
    shutil.rmtree(src, ignore_errors=True)
    for name in CODE:
        if (original / name).is_dir():
            shutil.copytree(original / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
        elif (original / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(original / name, src / name)
    return src


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child)
        child(spec["config"], spec["overrides"], Path(spec["snapshots"]) if spec["snapshots"] else None)
        return 0

    frozen = os.environ.get(FROZEN_ENV)
    if frozen is None:  # the first process: make the work folder, copy the code, and run the bench from the copy
        work = args.workdir or Path(tempfile.mkdtemp(prefix="flywheel-kills-"))
        work.mkdir(parents=True, exist_ok=True)
        cleanup = "" if args.workdir else str(work)
        command = shlex.join(["python", "bench/kill_harness.py", *argv])
        json_path = (args.json or REPO / "bench" / "results" /
                     ("kill_harness-smoke.json" if args.smoke else "kill_harness.json")).resolve()
        rest = _drop_values(argv, ("--workdir", "--json"))
        script = HERE / "kill_harness.py" if args.in_place else freeze_code(work, REPO) / "bench" / "kill_harness.py"
        env = {**os.environ, FROZEN_ENV: f"{command}\t{cleanup}"}
        os.execve(sys.executable, [sys.executable, str(script), *rest, "--workdir", str(work), "--json",
                                   str(json_path)], env)

    command, cleanup = frozen.split("\t")
    sys.argv = shlex.split(command)[1:]  # the command as typed, for the printed tables
    try:
        return bench(args, command)
    finally:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)


def _drop_values(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in flags)):
            out.append(a)
    return out


def bench(args: argparse.Namespace, command: str) -> int:
    from tests.helpers.models import tiny_overrides

    t_start = time.perf_counter()
    work = args.workdir.resolve()
    registry, snapshots, inputs = work / "registry", work / "snapshots", work / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    args.run_overrides = [*tiny_overrides(inputs, registry), f"run.iterations={args.iterations}", *args.overrides]

    print(f"reference run (uninterrupted) in {registry} ...", file=sys.stderr, flush=True)
    stages, ref_wall = reference_run(args, registry, snapshots)
    plan = plan_kills(stages, args.kills, args.seed, args.stages, tuple(args.u_range))
    if args.calibrate:
        calibrate(args, sorted({t.index: t for t, _ in plan}.values(), key=lambda t: t.index), registry, snapshots)
    kills: list[Kill] = []

    def one(target: StageTiming, u: float, extra: bool = False) -> None:
        k = kill_once(args, len(kills) + 1, target, u, stages, registry, snapshots)
        k.extra = extra
        kills.append(k)
        verdict = "matched" if k.matched else f"DIFFERS ({len(k.differences)})" if k.differences else "FAILED"
        print(f"kill {k.n}/{len(plan)}{' (extra)' if extra else ''}: target {k.target} u={k.u:.2f} "
              f"+{k.delay_s:.2f}s -> landed {k.landed} ({k.landed_detail}); resume {k.resume_s:.1f}s {verdict}",
              file=sys.stderr, flush=True)
        for d in k.differences[:5]:
            print(f"    {d}", file=sys.stderr, flush=True)
        if k.error:
            print("    " + k.error.replace("\n", "\n    "), file=sys.stderr, flush=True)

    for target, u in plan:
        one(target, u)
    # A stage no kill landed in (the run went faster or slower than measured) gets up to --cover more tries.
    rng = random.Random(args.seed + 1)
    for target in sorted({t.index: t for t, _ in plan}.values(), key=lambda t: t.index):
        for _ in range(args.cover):
            if any(k.landed == target.name for k in kills):
                break
            one(target, rng.uniform(*args.u_range), extra=True)
    wall = time.perf_counter() - t_start
    return report(args, command, stages, ref_wall, kills, wall)


def report(args, command: str, stages: list[StageTiming], ref_wall: float, kills: list[Kill], wall: float) -> int:
    rows = []
    for s in stages:
        mine = [k for k in kills if k.target == s.name]
        landed = [k for k in kills if k.landed == s.name]
        cold = "-" if s.cold_window_s is None else f"{s.cold_window_s:.2f}"
        rows.append([s.name, f"{s.window_s:.2f}", cold, len(mine), len(landed),
                     sum(k.landed == s.name for k in mine), sum(k.matched for k in landed),
                     sum(len(k.differences) for k in landed)])
    elsewhere = [k for k in kills if k.landed not in {s.name for s in stages}]
    if elsewhere:
        rows.append(["(no ledger row running)", "-", "-", "-", len(elsewhere), "-", sum(k.matched for k in elsewhere),
                     sum(len(k.differences) for k in elsewhere)])
    matched = sum(k.matched for k in kills)
    ndiff = sum(len(k.differences) for k in kills)
    failed = [k for k in kills if k.error]
    covered = sum(1 for s in stages if any(k.landed == s.name for k in kills))
    rows.append(["all", f"{sum(s.window_s for s in stages):.2f}", "-", len(kills),
                 sum(k.landed != "-" for k in kills), sum(k.landed == k.target for k in kills), matched, ndiff])
    notes = [
        (f"stages with a kill landed inside: {covered} / {len(stages)}; kills landed in the stage targeted: "
         f"{sum(k.landed == k.target for k in kills)} / {len(kills)}"),
        (f"resumes that matched the uninterrupted run: {matched} / {len(kills)}; differences found: {ndiff}; "
         f"kills or resumes that failed: {len(failed)}"),
        (f"reference run {ref_wall:.1f} s (its stages' ledger windows sum to {sum(s.window_s for s in stages):.1f} s); "
         f"the bench {wall:.1f} s in all, {sum(k.resume_s for k in kills):.1f} s of it in resumes"),
        ("window: the reference's stage_runs row, started_at -> finished_at; cold window: the same in a run started "
         "from the registry just before the stage (a fresh process, as each kill's run is); each kill waits until "
         "u x the cold window (the reference's when not measured) into the stage's ledger row, "
         f"u uniform in ({args.u_range[0]:g}, {args.u_range[1]:g}), seed {args.seed}"),
        ("landed: the stage whose ledger row the kill left 'running' (read on a copy of the killed registry); "
         "matched: the resumed registry equals the reference (tests/helpers/compare.py: tables less timestamps and "
         "timings, weights byte for byte, dataset version files, no duplicate keys, model folders complete)"),
    ]
    unkilled = [k for k in kills if not k.killed and not k.error]
    if unkilled:
        notes.insert(1, f"{len(unkilled)} runs finished before their kill (counted as kills that landed nowhere; "
                        f"compared all the same): {', '.join(f'#{k.n}' for k in unkilled)}")
    extra = [k for k in kills if k.extra]
    if extra:
        notes.insert(1, f"{len(extra)} of the {len(kills)} kills are extra (--cover {args.cover}): aimed again at a "
                        f"stage no earlier kill landed in ({', '.join(sorted({k.target for k in extra}))})")
    stray = sorted({p for k in kills for p in k.leftovers})
    if stray:
        notes.append(f"temp files a kill left and the resume did not remove (not counted as differences): "
                     f"{len(stray)}: {', '.join(stray[:4])}{' ...' if len(stray) > 4 else ''}")
    header = ["stage", "window s", "cold window s", "kills targeted", "landed in it", "of them targeted",
              "resumes matched", "differences"]
    print_table(f"Kill and resume, by stage: {len(kills)} kills", header, rows, notes, footer=False)

    per_kill = [[f"{k.n}{'+' if k.extra else ''}", k.target, f"{k.u:.2f}", f"{k.delay_s:.2f}", k.landed,
                 k.landed_detail, f"{k.resume_s:.1f}", "yes" if k.matched else "NO", len(k.differences)] for k in kills]
    diff_notes = [f"kill {k.n} ({k.target} -> {k.landed}): {d}" for k in kills for d in k.differences[:10]]
    diff_notes += [f"kill {k.n} ({k.target}): {k.error.splitlines()[0]}" for k in failed]
    print_table("Each kill", ["#", "target", "u", "kill after s", "landed", "at", "resume s", "matched",
                              "differences"], per_kill, diff_notes)

    record = {"command": command, "machine": machine(), "finished": datetime.now().isoformat(timespec="seconds"),
              "seed": args.seed, "u_range": args.u_range, "overrides": args.run_overrides,
              "reference": {"wall_s": round(ref_wall, 2), "stages": [asdict(s) for s in stages]},
              "kills": [{**asdict(k), "matched": k.matched} for k in kills],
              "summary": {"kills": len(kills), "matched": matched, "differences": ndiff, "failed": len(failed),
                          "stages": len(stages), "stages_landed": covered,
                          "landed_as_targeted": sum(k.landed == k.target for k in kills),
                          "wall_s": round(wall, 1)}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"- record: {args.json}")
    return 0 if matched == len(kills) else 1


if __name__ == "__main__":
    sys.exit(main())
