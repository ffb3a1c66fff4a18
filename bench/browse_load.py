"""`flywheel browse` on a big iteration: page load times of the real command over a registry with 250,000 pairs.

    python bench/browse_load.py                  # ~2 min here: builds the registry (SQL, ~30 s), 5 loads of each page
    python bench/browse_load.py --smoke          # 2,000 pairs, 1 load each
    python bench/browse_load.py --pairs 100000 --repeats 3

The registry is written with DuckDB INSERT ... SELECT from range() (no Python loop): one run, one iteration with its
ledger, a prompt, two candidates, two judge samples per candidate (every 50th a parse failure) and one pair per
prompt, texts of 10-200 words. `flywheel browse --port P` then runs as a subprocess on 127.0.0.1 and each page is
fetched over HTTP (urllib, the whole body read): the first page of pairs (sorted by margin), a page sorted by length
ratio, a filtered page (judge spread >= 1 and chosen longer), a text search, a deep page (the last), one pair's page,
a lineage page and the run view (the report's figures of the iteration). The baseline is that page's keys computed
from the tables each time (queries.KEYS_SQL: pairs joined to candidates and judge spreads, then the page's filters,
ORDER BY, LIMIT, OFFSET) in this process on the same file, as if the server did not keep each stage's keys in memory
(`queries.keys`; the first page pays for building them). Exits non-zero if a page did not answer 200.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _common import REPO, print_table, ratio

sys.path.insert(0, str(REPO))
RUN, SID = "bench-run", "pairs-bench"

BUILD = """
INSERT INTO runs VALUES ('{run}', 'bench', 'h', '{{}}', 'done', now(), now());
INSERT INTO iterations VALUES ('{run}', 1, 'm1', 'm2', 'done', now(), now());
INSERT INTO stage_runs BY NAME SELECT s || '-bench' AS stage_run_id, '{run}' AS run_id, 1 AS iteration, s AS stage,
    'm1' AS model_id, 'h' AS config_hash, 'done' AS status, '{{}}' AS stats, now() AS started_at, now() AS finished_at
    FROM (VALUES ('self_instruct'), ('generate'), ('judge'), ('pairs'), ('dpo')) v(s);
INSERT INTO run_stages SELECT '{run}', 1, s, s || '-bench' FROM (VALUES ('self_instruct'), ('generate'), ('judge'),
    ('pairs'), ('dpo')) v(s);
INSERT INTO models VALUES ('m1', '{run}', 'M1', 'sft', 0, NULL, '/m1', 'sft-bench', 'h', '{{}}', NULL, NULL, NULL,
    now(), NULL), ('m2', '{run}', 'M2', 'dpo', 1, 'm1', '/m2', 'dpo-bench', 'h', '{{}}', 'm1', NULL, NULL, now(), NULL);
INSERT INTO prompts BY NAME SELECT 'p' || lpad(i::VARCHAR, 7, '0') AS prompt_id, '{run}' AS run_id, 1 AS iteration,
    'self_instruct' AS source, 'Write about topic ' || i || ' ' || repeat('and its history ', i % 5) AS text,
    true AS kept, 'm1' AS model_id, 'self_instruct-bench' AS stage_run_id, 'h' AS config_hash, now() AS created_at
    FROM range({n}) t(i);
INSERT INTO candidates BY NAME SELECT 'c' || lpad(i::VARCHAR, 7, '0') || '-' || j AS candidate_id,
    'p' || lpad(i::VARCHAR, 7, '0') AS prompt_id, j AS sample_index,
    'Answer ' || j || ' to topic ' || i || ': ' || repeat('the river runs to the sea ', 2 + (i * 7 + j * 13) % 30)
        AS text, 10 + 7 * ((i * 7 + j * 13) % 30) AS num_tokens, 'stop' AS finish_reason, 'm1' AS model_id,
    'transformers' AS backend, '{{}}' AS sampling, j AS seed, '{run}' AS run_id, 1 AS iteration,
    'generate-bench' AS stage_run_id, 'h' AS config_hash, now() AS created_at
    FROM range({n}) t(i), range(2) u(j);
INSERT INTO judgments BY NAME SELECT 'j' || lpad(i::VARCHAR, 7, '0') || '-' || j || '-' || k AS judgment_id,
    'c' || lpad(i::VARCHAR, 7, '0') || '-' || j AS candidate_id, k AS sample_index,
    CASE WHEN i % 50 = 0 AND k = 1 THEN 'I cannot decide.' ELSE 'Reasoning... Score: ' || (5 - 2 * j - k * (i % 3) % 2)
    END AS raw_text, CASE WHEN i % 50 = 0 AND k = 1 THEN NULL ELSE 5 - 2 * j - k * (i % 3) % 2 END AS score,
    CASE WHEN i % 50 = 0 AND k = 1 THEN 'no_score' END AS parse_error, 'm1' AS judge_model_id, 't' AS template_hash,
    '{{}}' AS sampling, '{run}' AS run_id, 1 AS iteration, 'judge-bench' AS stage_run_id, 'h' AS config_hash,
    now() AS created_at
    FROM range({n}) t(i), range(2) u(j), range(2) v(k);
INSERT INTO pairs BY NAME SELECT 'pr-' || lpad(i::VARCHAR, 7, '0') AS pair_id, 'p' || lpad(i::VARCHAR, 7, '0') AS prompt_id,
    'c' || lpad(i::VARCHAR, 7, '0') || '-0' AS chosen_id, 'c' || lpad(i::VARCHAR, 7, '0') || '-1' AS rejected_id,
    5 - (i % 7) / 4 AS chosen_score, 1 + (i % 5) / 3 AS rejected_score,
    '{{"chosen": {{"judge": 4.5}}, "rejected": {{"judge": 1.5}}}}' AS signals, '{run}' AS run_id, 1 AS iteration,
    'pairs-bench' AS stage_run_id, 'h' AS config_hash, now() AS created_at
    FROM range({n}) t(i);
"""


def build(root: Path, n: int) -> float:
    from flywheel.registry import Registry

    started = time.perf_counter()
    with Registry(root) as reg:
        for statement in BUILD.format(run=RUN, n=n).split(";\n"):
            if statement.strip():
                reg.con.execute(statement)
        reg.con.execute("CHECKPOINT")
    return time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url: str) -> tuple[float, int]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=300) as r:
        body = r.read()
        if r.status != 200:
            raise SystemExit(f"{url}: HTTP {r.status}")
    return time.perf_counter() - started, len(body)


def baseline(root: Path, params: dict, repeats: int) -> float:
    """The page's keys computed from the tables with no kept keys (queries.KEYS_SQL, then the page's filters, ORDER BY,
    LIMIT and OFFSET), best of `repeats`, in this process: what each page would cost without `queries.keys`."""
    from flywheel.browse.queries import KEYS_SQL, SORTS, TEXT_CTES, PairQuery, _where
    from flywheel.registry import reader

    pq = PairQuery.parse(params)
    where, args = _where(pq)
    ctes = TEXT_CTES.replace("WITH ", ", ", 1) if "q" in args else ""
    keys_sql = KEYS_SQL.strip().replace("WITH spreads AS", "WITH spreads AS", 1)
    body, select = keys_sql.split("\nSELECT", 1)
    sql = f"{body}{ctes}, pair_keys AS (SELECT{select}) SELECT pair_id FROM pair_keys{where}"
    order = f"{SORTS[pq.sort.lstrip('-')]} {'DESC' if pq.sort.startswith('-') else 'ASC'} NULLS LAST, pair_id"
    args = {**args, "pairs": "pairs-bench", "judge": "judge-bench"}
    best = float("inf")
    with reader(root) as reg:
        for _ in range(repeats):
            started = time.perf_counter()
            reg.rows(f"{sql} ORDER BY {order} LIMIT {pq.size} OFFSET {(pq.page - 1) * pq.size}", args)
            best = min(best, time.perf_counter() - started)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=250_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="2,000 pairs, 1 load each")
    args = ap.parse_args()
    n, repeats = (2_000, 1) if args.smoke else (args.pairs, args.repeats)
    last = max(1, -(-n // 50))
    pages = [  # (page, path, query params of a pairs page or None)
        ("first page (margin desc)", f"/run/{RUN}/1", {}),
        ("sorted by length ratio", f"/run/{RUN}/1?sort=-ratio", {"sort": "-ratio"}),
        ("filtered (spread >= 1, chosen longer)", f"/run/{RUN}/1?min_spread=1&longer=chosen&sort=-spread",
         {"min_spread": "1", "longer": "chosen", "sort": "-spread"}),
        ("text search", f"/run/{RUN}/1?q=topic+{n - 7}%3A", {"q": f"topic {n - 7}:"}),
        (f"deep page ({last} of {last})", f"/run/{RUN}/1?page={last}", {"page": str(last)}),
        ("one pair", f"/pair/pr-{n // 2:07d}", None),
        ("lineage of a pair", f"/id/pr-{n // 2:07d}", None),
        ("run view (report figures)", f"/run/{RUN}", None),
    ]
    with tempfile.TemporaryDirectory(prefix="fw-browse-bench-") as tmp:
        root = Path(tmp) / "registry"
        built = build(root, n)
        size_mb = (root / "flywheel.duckdb").stat().st_size / 1e6
        port = free_port()
        flywheel = Path(sys.executable).with_name("flywheel")
        log = open(Path(tmp) / "browse.log", "w")
        proc = subprocess.Popen([str(flywheel), "browse", "--registry", str(root), "--port", str(port)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            base, started = f"http://127.0.0.1:{port}", time.perf_counter()
            while True:
                try:
                    fetch(base + "/")
                    break
                except OSError:
                    if proc.poll() is not None or time.perf_counter() - started > 180:
                        raise SystemExit(f"flywheel browse did not start: {(Path(tmp) / 'browse.log').read_text()}")
                    time.sleep(0.2)
            start_s = time.perf_counter() - started
            rows = []
            for name, path, params in pages:
                times, size = [], 0
                for _ in range(repeats):
                    t, size = fetch(base + path)
                    times.append(t)
                bare = baseline(root, params, repeats) if params is not None else None
                med = statistics.median(times)
                rows.append([name, f"{med * 1000:.0f}", f"{max(times) * 1000:.0f}", f"{size / 1000:.0f}",
                             "-" if bare is None else f"{bare * 1000:.0f}", "-" if bare is None else ratio(med, bare)])
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
    print_table(f"flywheel browse over {n:,} pairs ({size_mb:.0f} MB registry)",
                ["page", "median ms", "max ms", "KB", "keys from the tables ms", "vs that"], rows,
                [f"registry built with SQL in {built:.1f} s; `flywheel browse` answered its first page "
                 f"{start_s:.1f} s after start (imports)", f"{repeats} loads of each page, 50 pairs a page",
                 f"load average {os.getloadavg()[0]:.2f}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
