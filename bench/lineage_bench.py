"""Lineage and dataset freezing at scale: `lineage(pair_id)` and `freeze_stage_outputs` on a million candidates.

    python bench/lineage_bench.py                      # 1,000,000 candidates (builds in about a minute on 2 cores)
    python bench/lineage_bench.py --smoke              # 20,000 candidates, 5 pairs
    python bench/lineage_bench.py --candidates 50000   # any size
    python bench/lineage_bench.py --keep DIR           # build (or reuse) the registry in DIR and keep it

It fills a real registry with synthetic rows in DuckDB SQL (range()): N/4 self-instruct prompts from 8 seeds, N
candidates (4 per prompt), 3 judge samples and one coherent reward per candidate, one pair per prompt, and the
models, stage runs and run stages that link them, inserted in the order the real stages write them (judgments and
rewards by candidate id). It times freezing the candidates, judgments and pairs (+ train) datasets, first and again
(the same version, no new row), and reading the train version back with its hash checked; then `lineage()` of
random pairs: cold (a fresh registry connection per pair) and warm (the same pair again on that connection).
Figures, not a claim against a baseline: the brief is "a handful of keyed queries", so warm lineage should stay in
the tens of milliseconds however large the registry.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import print_table  # sets the environment; first

from flywheel.registry import Registry
from flywheel.registry.datasets import freeze_stage_outputs, read_version
from flywheel.registry.lineage import lineage

RUN = "bench-run"
SID = {s: f"{s}-{i:016x}" for i, s in enumerate(["seeds", "base", "sft", "self_instruct", "generate", "judge",
                                                  "reward", "pairs", "dpo"])}
FILL = [
    ("models", """INSERT INTO models (model_id, run_id, name, kind, iteration, parent_id, path, stage_run_id,
                  config_hash, ref_model_id, created_at) VALUES
        ($base, $run, 'PT', 'base', 0, NULL, 'models/pt', $base, 'h', NULL, now()),
        ($sft, $run, 'M1', 'sft', 0, $base, 'models/m1', $sft, 'h', NULL, now()),
        ($dpo, $run, 'M2', 'dpo', 1, $sft, 'models/m2', $dpo, 'h', $sft, now())"""),
    ("stages", """INSERT INTO stage_runs SELECT sid, $run, it, stage, NULL, 'h', 'done', '{}', NULL, now(), now()
        FROM (VALUES ($seeds, 0, 'seeds'), ($base, 0, 'base'), ($sft, 0, 'sft'), ($self_instruct, 1, 'self_instruct'),
                     ($generate, 1, 'generate'), ($judge, 1, 'judge'), ($reward, 1, 'reward'), ($pairs, 1, 'pairs'),
                     ($dpo, 1, 'dpo')) t(sid, it, stage);
        INSERT INTO run_stages SELECT $run, iteration, stage, stage_run_id FROM stage_runs"""),
    ("templates", "INSERT INTO templates VALUES ('tpl0123456789abcd', 'judge', 'Score: <0-5>', now())"),
    ("prompts", """INSERT INTO prompts SELECT 'p-seed-' || i, $run, 0, 'seed', 'Seed instruction number ' || i,
               'A reference answer.', 's' || i, NULL, true, NULL, NULL, $seeds, 'h', now() FROM range(8) t(i);
        INSERT INTO prompts SELECT 'p-' || md5('p' || i)[:16], $run, 1, 'self_instruct',
               'Write a short explanation of topic ' || i || ' for a curious reader.', NULL, NULL,
               ['p-seed-' || (i % 8), 'p-seed-' || ((i + 3) % 8)], true, NULL, $sft, $self_instruct, 'h', now()
        FROM range($prompts) t(i)"""),
    ("candidates", """INSERT INTO candidates SELECT 'c-' || md5('c' || i)[:16], 'p-' || md5('p' || (i // 4))[:16],
               i % 4, 'Answer ' || i || ': ' || repeat('the quick brown fox jumps over the lazy dog ', 4), 48,
               'stop', $sft, 'vllm', '{"max_new_tokens": 512, "n": 4, "temperature": 0.7, "top_p": 0.9}',
               1000 + i // 64, $run, 1, $generate, 'h', now()
        FROM range($n) t(i)"""),
    ("judgments", """INSERT INTO judgments SELECT 'j-' || md5('j' || candidate_id || k)[:16], candidate_id, k,
               'The response is relevant and mostly complete. Score: ' || ((hash(candidate_id) + k) % 6),
               ((hash(candidate_id) + k) % 6)::DOUBLE, NULL, $sft, 'tpl0123456789abcd',
               '{"n": 3, "temperature": 0.7, "top_p": 0.9}', $run, 1, $judge, 'h', now()
        FROM candidates, range(3) t(k) WHERE stage_run_id = $generate ORDER BY candidate_id, k"""),
    ("rewards", """INSERT INTO rewards SELECT 'rw-' || md5('r' || candidate_id)[:16], candidate_id, 'coherent',
               (hash(candidate_id) % 1000) / 100.0, NULL, '{"logp_pt": -40.0, "logp_sft": -31.5, "tokens": 48}',
               $sft, $base, $run, 1, $reward, 'h', now()
        FROM candidates WHERE stage_run_id = $generate ORDER BY candidate_id"""),
    ("pairs", """INSERT INTO pairs SELECT 'pr-' || md5('pr' || i)[:16], 'p-' || md5('p' || i)[:16],
               'c-' || md5('c' || (4 * i))[:16], 'c-' || md5('c' || (4 * i + 1))[:16], 4.5, 1.0,
               '{"weights": {"judge": 1.0, "coherent": 0.5}, "rho": 0.0, "chosen": {"judge": 4.5, "coherent": 2.0},
                 "rejected": {"judge": 1.0, "coherent": -1.0}}', $run, 1, $pairs, 'h', now()
        FROM range($prompts) t(i)"""),
]


def build(root: Path, n: int) -> list[tuple[str, float, int]]:
    """Fill the registry; returns (table, seconds, rows) per step."""
    timings = []
    params = {"run": RUN, "n": n, "prompts": n // 4, **SID}
    with Registry(root) as reg:
        reg.con.execute("SET enable_progress_bar = false")
        for table, sql in FILL:
            t0 = time.perf_counter()
            with reg.transaction() as con:
                for statement in sql.split(";"):
                    used = {k: v for k, v in params.items() if f"${k}" in statement}
                    con.execute(statement, used)
            rows = reg.scalar(f"SELECT count(*) FROM {table if table != 'stages' else 'stage_runs'}")
            timings.append((table, time.perf_counter() - t0, rows))
    return timings


def time_freeze(root: Path) -> list[list]:
    """[dataset(s), rows, seconds first, seconds again, versions] per freezing stage, then the verified read."""
    out = []
    with Registry(root) as reg:
        for stage, inputs in (("generate", {"prompts": SID["self_instruct"]}),
                              ("judge", {"candidates": SID["generate"]}),
                              ("pairs", {"judgments": SID["judge"], "rewards": SID["reward"]})):
            seconds, found = [], []
            for _ in ("first", "again"):
                t0 = time.perf_counter()
                found.append(freeze_stage_outputs(reg, stage, SID[stage], run_id=RUN, iteration=1, inputs=inputs,
                                                  config_hash="h"))
                seconds.append(time.perf_counter() - t0)
            if found[0] != found[1]:
                raise SystemExit(f"freezing {stage} again gave other versions: {found}")
            rows = reg.scalar("SELECT sum(num_rows) FROM dataset_versions WHERE version_id IN (SELECT unnest(?))",
                              [list(found[0].values())])
            out.append([" + ".join(found[0]), f"{rows:,}", f"{seconds[0]:.2f}", f"{seconds[1]:.2f}",
                        " ".join(found[0].values())])
        t0 = time.perf_counter()
        table = read_version(reg, found[0]["train"])
        out.append(["read_version(train), hash checked", f"{table.num_rows:,}", f"{time.perf_counter() - t0:.2f}",
                    "-", found[0]["train"]])
    return out


def time_lineage(root: Path, samples: int, seed: int = 0) -> dict[str, list[float]]:
    with Registry(root) as reg:
        n = reg.scalar("SELECT count(*) FROM pairs")
        picks = random.Random(seed).sample(range(n), min(samples, n))
        ids = [r[0] for r in reg.con.execute("SELECT 'pr-' || md5('pr' || i)[:16] FROM unnest(?) t(i)",
                                             [picks]).fetchall()]
    cold, warm, opened = [], [], []
    for pair_id in ids:
        t0 = time.perf_counter()
        with Registry(root) as reg:
            t1 = time.perf_counter()
            result = lineage(reg, pair_id)
            t2 = time.perf_counter()
            lineage(reg, pair_id)
            t3 = time.perf_counter()
        assert result["pair"]["pair_id"] == pair_id and len(result["chosen"]["judgments"]) == 3
        assert result["trained"] and result["chosen"]["rewards"]
        opened.append(t1 - t0)
        cold.append(t2 - t1)
        warm.append(t3 - t2)
    return {"open registry": opened, "lineage cold": cold, "lineage warm": warm}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--candidates", type=int, default=1_000_000)
    p.add_argument("--pairs", type=int, default=20, help="random pairs to trace (default 20)")
    p.add_argument("--smoke", action="store_true", help="20,000 candidates and 5 pairs")
    p.add_argument("--keep", type=Path, help="build the registry here and keep it (reused if already built)")
    p.add_argument("--no-freeze", action="store_true", help="skip the freezing timings")
    args = p.parse_args(argv)
    if args.smoke:
        args.candidates, args.pairs = 20_000, 5

    root = args.keep or Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    notes = [f"registry {root}"]
    if (root / "flywheel.duckdb").exists():
        notes.append("registry reused as found (not rebuilt)")
    else:
        built = build(root, args.candidates)
        notes.append("built in " + ", ".join(f"{t} {rows:,} rows {s:.1f} s" for t, s, rows in built if rows > 10))
    if not args.no_freeze:
        print_table(f"Freezing datasets ({args.candidates:,} candidates)",
                    ["dataset", "rows", "first (s)", "again (s)", "version"], time_freeze(root), notes)
    rows = []
    for what, seconds in time_lineage(root, args.pairs).items():
        ms = sorted(x * 1000 for x in seconds)
        rows.append([what, f"{statistics.median(ms):.1f}", f"{ms[min(len(ms) - 1, int(0.9 * len(ms)))]:.1f}",
                     f"{ms[-1]:.1f}"])
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    print_table(f"lineage(pair_id) over {args.pairs} random pairs ({args.candidates:,} candidates)",
                ["what", "median (ms)", "p90 (ms)", "max (ms)"], rows,
                [f"registry on disk: {size / 2**20:,.0f} MiB", "cold: a new Registry connection per pair (open "
                 "time apart); warm: the same pair again on it"])
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
