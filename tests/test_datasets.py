"""Versioned datasets on a real DuckDB registry, filled stage by stage through `run_stage` (which freezes each stage's
outputs), with rows written by hand so every score and pair is known (tests/helpers/staged.py). No model runs: the
stages' rows are what the real stages would write, and the freezing, hashing, reading, diffing and exporting are the
real thing."""

import json

import pyarrow.parquet as pq
import pytest

from flywheel import cli
from flywheel.registry import Registry
from flywheel.registry.datasets import (
    DatasetIntegrityError,
    code_hash,
    diff_pairs,
    export_version,
    file_content_sha256,
    freeze_stage_outputs,
    list_versions,
    read_version,
    restore_version,
    run_iteration_version,
)
from tests.helpers.staged import PROMPTS, SEEDS, build_flywheel
from tests.helpers.staged import versions as _versions


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """One registry, two runs: run-a (judge variant 0, two iterations) and run-b (judge variant 1, one iteration),
    which shares run-a's seeds, prompts, candidates and rewards of iteration 1. Tests here only read it."""
    root = tmp_path_factory.mktemp("registry")
    a = build_flywheel(root, run_id="run-a", variant=0, iterations=2)
    b = build_flywheel(root, run_id="run-b", variant=1, iterations=1)
    return root, a, b


def test_same_content_same_version_and_no_new_row(two_runs, tmp_path):
    root, first, _ = two_runs
    expected = {"seeds": ["seeds"], "base": [], "sft": [], "self_instruct:1": ["prompts"],
                "generate:1": ["candidates"], "judge:1": ["judgments"], "reward:1": ["rewards"],
                "pairs:1": ["pairs", "train"], "dpo:1": []}
    assert {k: sorted(_versions(r)) for k, r in first.items() if not k.endswith(":2")} == expected

    with Registry(root) as reg:
        rows = reg.rows("SELECT version_id, name, num_rows, path, sha256, code_hash FROM dataset_versions "
                        "WHERE run_id = 'run-a' AND iteration <= 1")
        assert len(rows) == 7 and {r["code_hash"] for r in rows} == {code_hash()}
        counts = {r["name"]: r["num_rows"] for r in rows}
        assert counts == {"seeds": 3, "prompts": 5, "candidates": 12, "judgments": 24, "rewards": 12, "pairs": 3,
                          "train": 3}
        for r in rows:
            path = reg.root / r["path"]
            assert path == reg.root / "datasets" / r["name"] / f"{r['version_id']}.parquet"
            assert file_content_sha256(path) == (r["sha256"], r["num_rows"])
            assert r["version_id"] == f"{r['name']}-{r['sha256'][:16]}"

        # The train set holds the registry's pairs with their texts, in TRL's columns.
        pairs = first["pairs:1"]
        train = read_version(reg, _versions(pairs)["train"])
        assert train.column_names[:3] == ["prompt", "chosen", "rejected"]
        assert sorted(train.select(["prompt", "chosen", "rejected"]).to_pylist(), key=str) == sorted(reg.rows(
            "SELECT p.text AS prompt, ch.text AS chosen, rj.text AS rejected FROM pairs pr "
            "JOIN prompts p USING (prompt_id) JOIN candidates ch ON ch.candidate_id = pr.chosen_id "
            "JOIN candidates rj ON rj.candidate_id = pr.rejected_id WHERE pr.stage_run_id = ?",
            [pairs.stage_run_id]), key=str)
        seeds = read_version(reg, _versions(first["seeds"])["seeds"]).to_pylist()
        assert [r["text"] for r in seeds if r["responses"]] == [SEEDS[0][1]]  # the seed's ranked human answer

        # Freezing the same stage again: the same versions, no new manifest row, files untouched.
        total = reg.scalar("SELECT count(*) FROM dataset_versions")
        files = {r["path"]: (reg.root / r["path"]).stat().st_mtime_ns for r in rows}
        again = freeze_stage_outputs(reg, "pairs", pairs.stage_run_id, run_id="run-a", iteration=1,
                                     inputs={"judgments": first["judge:1"].stage_run_id}, config_hash="other")
        assert again == _versions(pairs)
        assert reg.scalar("SELECT count(*) FROM dataset_versions") == total
        assert {p: (reg.root / p).stat().st_mtime_ns for p in files} == files

    # Running the same run again skips every stage and adds nothing; a second registry built the same way
    # (other timestamps) gets exactly the same version ids.
    rerun = build_flywheel(root, run_id="run-a", variant=0, iterations=2)
    assert all(r.skipped for r in rerun.values())
    other = build_flywheel(tmp_path, run_id="run-a", variant=0, iterations=1)
    assert {k: _versions(r) for k, r in other.items()} == \
        {k: _versions(r) for k, r in first.items() if not k.endswith(":2")}
    with Registry(root) as reg:
        assert reg.scalar("SELECT count(*) FROM dataset_versions") == total


def test_a_changed_stage_gets_a_new_version_derived_from_upstream(two_runs):
    root, a, b = two_runs  # run-b: same prompts and candidates as run-a's iteration 1, another judge
    for stage in ("seeds", "self_instruct:1", "generate:1", "reward:1"):
        assert b[stage].skipped and _versions(b[stage]) == _versions(a[stage])
    for stage in ("judge:1", "pairs:1"):
        assert not b[stage].skipped
        assert set(_versions(b[stage]).values()).isdisjoint(_versions(a[stage]).values())

    v = {k: _versions(r) for k, r in b.items()}
    with Registry(root) as reg:
        derived = {r["version_id"]: sorted(r["derived_from"] or []) for r in
                   reg.rows("SELECT version_id, derived_from FROM dataset_versions")}
        used_by_b = {r["version_id"] for r in list_versions(reg, run="run-b")}
        first_by_b = {r["version_id"] for r in list_versions(reg, run="run-b") if r["run_id"] == "run-b"}
        newest_pairs = [r for r in list_versions(reg, name="pairs") if r["iteration"] == 1][-1]["version_id"]
    assert derived[v["seeds"]["seeds"]] == []
    assert derived[v["self_instruct:1"]["prompts"]] == [v["seeds"]["seeds"]]
    assert derived[v["generate:1"]["candidates"]] == [v["self_instruct:1"]["prompts"]]
    assert derived[v["judge:1"]["judgments"]] == [v["generate:1"]["candidates"]]
    assert derived[v["reward:1"]["rewards"]] == [v["generate:1"]["candidates"]]
    assert derived[v["pairs:1"]["pairs"]] == sorted([v["judge:1"]["judgments"], v["reward:1"]["rewards"]])
    assert derived[v["pairs:1"]["train"]] == [v["pairs:1"]["pairs"]]
    # iteration 2's prompts come from the seeds and iteration 1's prompts (self-instruct's "earlier" input)
    assert derived[_versions(a["self_instruct:2"])["prompts"]] == sorted([v["seeds"]["seeds"],
                                                                         v["self_instruct:1"]["prompts"]])
    assert used_by_b == {x for r in b.values() for x in _versions(r).values()}
    assert first_by_b == {v["judge:1"]["judgments"], v["pairs:1"]["pairs"], v["pairs:1"]["train"]}
    assert newest_pairs == v["pairs:1"]["pairs"]


def test_a_damaged_file_is_refused_with_its_name(tmp_path, capsys):
    run = build_flywheel(tmp_path)
    damaged = {"missing": _versions(run["pairs:1"])["train"], "unreadable": _versions(run["pairs:1"])["pairs"],
               "altered": _versions(run["generate:1"])["candidates"]}
    with Registry(tmp_path) as reg:
        paths = {k: reg.root / reg.scalar("SELECT path FROM dataset_versions WHERE version_id = ?", [v])
                 for k, v in damaged.items()}
        paths["missing"].unlink()
        paths["unreadable"].write_bytes(b"PAR1 not really parquet")
        table = pq.read_table(paths["altered"])  # a valid Parquet file whose content differs by one word
        rows = table.to_pylist()
        rows[0]["text"] = rows[0]["text"].replace("answer", "answers")
        pq.write_table(table.from_pylist(rows, schema=table.schema), paths["altered"])
        for damage, message in (("missing", "is missing"), ("unreadable", "cannot be read"),
                                ("altered", "was altered")):
            with pytest.raises(DatasetIntegrityError, match=message) as err:
                read_version(reg, damaged[damage])
            assert str(paths[damage]) in str(err.value)

        # Freezing the stage again puts the pairs stage's missing and damaged files back, identical.
        freeze_stage_outputs(reg, "pairs", run["pairs:1"].stage_run_id, run_id="run-a", iteration=1, inputs={},
                             config_hash="h")
        assert read_version(reg, damaged["missing"]).num_rows == 3
        assert read_version(reg, damaged["unreadable"]).num_rows == 3
        assert reg.scalar("SELECT count(*) FROM dataset_versions") == 7

    capsys.readouterr()
    assert cli.main(["datasets", "show", damaged["altered"], "--registry", str(tmp_path)]) == 2
    out = capsys.readouterr().out.replace("\n", "")
    assert str(paths["altered"]) in out and "was altered" in out
    assert cli.main(["datasets", "restore", damaged["altered"], "--registry", str(tmp_path)]) == 0
    assert cli.main(["datasets", "show", damaged["altered"], "--registry", str(tmp_path)]) == 0
    assert "content hash verified" in capsys.readouterr().out

    # A version whose registry rows changed since cannot be restored: the error says so.
    with Registry(tmp_path) as reg:
        reg.con.execute("UPDATE candidates SET text = 'rewritten' WHERE candidate_id = ?", [rows[1]["candidate_id"]])
        paths["altered"].unlink()
        with pytest.raises(DatasetIntegrityError, match="cannot restore"):
            restore_version(reg, damaged["altered"])


def test_export_to_a_hugging_face_folder_and_parquet(two_runs, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    root, run, _ = two_runs
    versions = _versions(run["pairs:1"])
    with Registry(root) as reg:
        expected = read_version(reg, versions["train"]).to_pylist()
        for name in ("train", "pairs"):  # a pairs version is exported with its texts joined in
            out = export_version(reg, versions[name], tmp_path / f"hf-{name}", format="hf")
            ds = datasets.load_from_disk(str(out))
            assert ds.column_names[:3] == ["prompt", "chosen", "rejected"]
            assert ds.to_list() == expected
            assert json.loads(ds.info.description)["flywheel_version"] == versions[name]
        path = export_version(reg, versions["train"], tmp_path / "pq", format="parquet")
        assert pq.read_table(path).to_pylist() == expected
        cands = export_version(reg, _versions(run["generate:1"])["candidates"], tmp_path / "pq", format="parquet")
        assert pq.read_table(cands).num_rows == 12 and "prompt" not in pq.read_table(cands).column_names
        with pytest.raises(ValueError, match="not empty"):
            export_version(reg, versions["train"], tmp_path / "hf-train", format="hf")
    assert not (tmp_path / "hf_home").exists()  # built in memory, nothing cached

    code = cli.main(["datasets", "export", versions["train"], "--out", str(tmp_path / "cli"), "--registry", str(root)])
    assert code == 0 and datasets.load_from_disk(str(tmp_path / "cli")).num_rows == 3


def test_diff_of_two_pair_sets(two_runs, capsys):
    root, a, b = two_runs
    with Registry(root) as reg:
        d = diff_pairs(reg, _versions(a["pairs:1"])["train"], _versions(b["pairs:1"])["pairs"])
        assert [p["prompt"] for p in d["added"]] == [PROMPTS[1][2]]     # tied under judge 0, not under judge 1
        assert [p["prompt"] for p in d["removed"]] == [PROMPTS[1][1]]   # the other way round
        assert d["unchanged"] == 1
        (changed,) = d["changed"]
        assert changed["prompt"] == PROMPTS[1][0]
        assert changed["fields"] == ["chosen", "rejected"]  # same scores, the other candidates
        assert (changed["a"]["chosen"], changed["b"]["chosen"]) == (f"answer 0 to {PROMPTS[1][0]}",
                                                                    f"answer 1 to {PROMPTS[1][0]}")
        assert run_iteration_version(reg, "run-a", 2) == _versions(a["pairs:2"])["train"]
        same = diff_pairs(reg, _versions(a["pairs:1"])["pairs"], _versions(a["pairs:1"])["train"])
        assert not (same["added"] or same["removed"] or same["changed"]) and same["unchanged"] == 3

    capsys.readouterr()
    assert cli.main(["datasets", "diff", "--run", "run-a", "--iterations", "1", "2", "--format", "json",
                     "--registry", str(root)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["removed"]) == 3 and len(d["added"]) == 3 and not d["changed"]  # new prompts in iteration 2
    assert cli.main(["datasets", "diff", _versions(a["pairs:1"])["train"], _versions(b["pairs:1"])["train"],
                     "--registry", str(root)]) == 0
    assert "1 added, 1 removed, 1 changed, 1 unchanged" in capsys.readouterr().out
    assert cli.main(["datasets", "list", "--run", "run-b", "--name", "train", "--registry", str(root)]) == 0
    assert _versions(b["pairs:1"])["train"] in capsys.readouterr().out
    assert cli.main(["datasets", "diff", "--run", "run-a", "--iterations", "1", "7", "--registry", str(root)]) == 2
    assert "no 'train' dataset in iteration 7" in capsys.readouterr().out
    assert cli.main(["datasets", "list", "--registry", str(root / "nowhere")]) == 2
    assert not (root / "nowhere").exists()


def test_content_hash_does_not_depend_on_how_the_file_is_read(two_runs, monkeypatch):
    """The hash streams the file in batches; batch boundaries must not change it."""
    import flywheel.registry.datasets as ds

    root, run, _ = two_runs
    with Registry(root) as reg:
        vid = _versions(run["judge:1"])["judgments"]
        path = reg.root / reg.scalar("SELECT path FROM dataset_versions WHERE version_id = ?", [vid])
        whole = file_content_sha256(path)
        monkeypatch.setattr(ds, "HASH_BATCH_ROWS", 5)
        assert file_content_sha256(path) == whole and whole[1] == 24
        rows = read_version(reg, vid).column("judgment_id").to_pylist()
        assert rows == sorted(rows)


def test_what_a_killed_writer_left_is_swept_by_the_next(tmp_path):
    """A kill between writing a temp file and renaming it leaves `.tmp-...-<pid>`; the next writer of the same
    dataset (or model folder) removes it (a temp file of a process still alive is left alone)."""
    import subprocess
    import sys

    from flywheel.backends.models import save_atomically
    from flywheel.registry.datasets import freeze_dataset
    from tests.helpers.models import seed_tokenizer, tiny_model

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    run = build_flywheel(tmp_path)
    sid = run["generate:1"].stage_run_id
    folder = tmp_path / "datasets" / "candidates"
    left = folder / f".tmp-{sid}-{dead}.parquet"
    left.write_bytes(b"half a file")
    with Registry(tmp_path) as reg:
        freeze_dataset(reg, "candidates", sid, run_id="run-a", iteration=1, derived_from=[], config_hash="h")
    assert not left.exists()
    assert not list(folder.glob(".tmp-*"))

    models = tmp_path / "models"
    stale = models / f".m.tmp-{dead}"
    stale.mkdir(parents=True)
    tok = seed_tokenizer()
    save_atomically(tiny_model(tok), tok, models / "m")
    assert (models / "m" / "config.json").is_file() and not stale.exists()
