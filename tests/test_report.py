"""The per-iteration report on a real DuckDB registry written by hand (tests/helpers/registry.build_run): the figures it
counts, the terminal tables, report.md with its PNG plots, the Markdown string for Prefect, and `flywheel report`;
and its example pairs on a run whose pairs, texts and judge samples are each written here (`build_examples_run`)."""

from __future__ import annotations

import json
import random

import pytest
from markdown_it import MarkdownIt
from rich.console import Console

from flywheel.analysis.monitors import evaluate
from flywheel.analysis.report import CLIP, collect, example_pairs, markdown, print_report, spearman, write
from flywheel.cli import main as cli_main
from flywheel.registry import Registry, now
from tests.helpers.registry import (
    HEALTHY,
    add_stage,
    build_run,
    candidate_row,
    insert_rows,
    judgment_row,
    prompt_row,
    steady_tokens,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _coherent(p, j):
    return [0.5, -1.0, 0.2, 0.1][j] + 0.01 * p


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two runs: 'run-old' with one iteration, then 'run-new' with three (a coherent reward in iteration 2)."""
    root = tmp_path_factory.mktemp("registry")
    build_run(root, [HEALTHY], run_id="run-old")
    build_run(root, [dict(HEALTHY, dropped={"too_short": 2, "near_duplicate": 1}),
                     dict(HEALTHY, tokens=lambda p, j: 2 * steady_tokens(p, j), coherent=_coherent, loss=0.4),
                     dict(HEALTHY, scores=lambda p, j: [3, None])], run_id="run-new")
    return root


def test_figures_are_counted_from_the_registry(registry):
    with Registry(registry) as reg:
        its = collect(reg, "run-new")
    assert [it["iteration"] for it in its] == [1, 2, 3]
    one, two, three = its
    assert (one["prompts_made"], one["prompts_kept"], one["prompts_dropped"]) == (23, 20, {"near_duplicate": 1,
                                                                                          "too_short": 2})
    assert (one["model_in"], one["model_out"], one["trainer"]) == ("M1", "M2", "dpo")
    assert (two["model_in"], two["model_out"]) == ("M2", "M3")
    assert one["candidates"] == 80 and one["judge_samples"] == 160 and one["parse_failure_rate"] == 0
    assert one["mean_score"] == 3.0 and one["sample_score_counts"] == {"1": 40, "3": 80, "5": 40}
    assert [n for _, _, n in one["candidate_score_hist"]] == [0, 0, 20, 0, 0, 0, 40, 0, 0, 20]
    assert one["mean_tokens"] == 22.5 and one["mean_words"] == 20
    assert one["pairs"] == 20 and one["margin"]["median"] == 4 and one["longer_chosen_share"] == 0.5
    assert one["agreement"] is None and one["rewards"] == {}
    assert two["rewards"]["coherent"]["candidates"] == 80 and two["agreement_candidates"] == 80
    assert two["agreement"] == spearman([float(HEALTHY["scores"](p, j)[0]) for p in range(20) for j in range(4)],
                                        [_coherent(p, j) for p in range(20) for j in range(4)])
    assert one["train_loss"] == 0.6 and two["training"] == {"train_loss": 0.4, "steps": 3}
    # deltas against the iteration before
    assert one["delta"]["mean_tokens"] is None
    assert two["delta"]["mean_tokens"] == 22.5 and two["delta"]["train_loss"] == pytest.approx(-0.2)
    assert three["parse_failure_rate"] == 0.5 and three["delta"]["parse_failure_rate"] == 0.5
    assert three["judge_self_agreement"] is None  # one valid sample per candidate: nothing to compare
    # example pairs: every margin is 4, so pair ids decide: ids sort as 0, 1, 10, ..., 19, 2, ..., 9 (20 pairs)
    assert [(ex["role"], ex["pair_id"]) for ex in one["examples"]] == [("largest margin", "run-new-pr-1-9"),
                                                                       ("median margin", "run-new-pr-1-17"),
                                                                       ("smallest margin", "run-new-pr-1-0")]
    assert one["examples"][0]["chosen"]["judge_mean"] == 5 and one["examples"][0]["rejected"]["rationale"] == "Score: 1"
    assert three["pairs"] == 0 and three["examples"] == []  # every candidate scored 3: no pair, no example


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    rng = random.Random(3)
    for _ in range(20):
        xs = [rng.randint(0, 5) for _ in range(30)]  # many ties, as judge scores have
        ys = [x + rng.gauss(0, 2) for x in xs]
        assert spearman(xs, ys) == pytest.approx(spearmanr(xs, ys).statistic, abs=1e-4)
    assert spearman([1, 2], [2, 1]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_terminal_text_shows_every_iteration_and_the_warnings(registry):
    with Registry(registry) as reg:
        its = collect(reg, "run-new")
    console = Console(record=True, width=250)
    print_report("run-new", its, evaluate(its), console)
    text = console.export_text()
    for label in ("mean judge score", "parse-failure rate", "mean length (tokens)", "pairs", "train loss",
                  "judge vs coherent", "iteration 3 (M3 -> M4)", "near_duplicate 1, too_short 2"):
        assert label in text
    assert "45.0 (+22.5)" in text  # iteration 2's length, with its change
    assert "WARNING length_drift (length drift), iteration 2: mean length 22.5 -> 45.0 tokens (+100%" in text
    assert "WARNING parse_failures (broken judge), iteration 3" in text


def test_markdown_file_and_plots(registry):
    with Registry(registry) as reg:
        its, checks, path = write(reg, "run-new")
    assert path == registry / "runs" / "run-new" / "report.md"
    text = path.read_text()
    assert text.startswith("# Report: run run-new")
    assert "Iteration 0: 5 seeds; PT -> M1 by SFT on 5 IFT + 3 EFT examples, loss 1.500" in text
    assert "| mean length (tokens) | 22.5 | 45.0 (+22.5) | 22.5 (-22.5) |" in text
    assert "- **WARNING length_drift** (length drift), iteration 2" in text
    assert "| parse_failures | ok | ok | WARN |" in text
    images = ["curves.png", "scores-1.png", "scores-2.png", "scores-3.png"]
    for name in images:
        assert f"]({name})" in text
        png = (path.parent / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    saved = json.loads((path.parent / "report.json").read_text())
    assert [it["iteration"] for it in saved["iterations"]] == [1, 2, 3]
    assert {c["name"] for c in saved["checks"] if c["status"] == "WARN"} == {"length_drift", "parse_failures"}


def test_markdown_string_for_a_prefect_artifact(registry):
    with Registry(registry) as reg:
        text = markdown(reg, "run-new")
    assert "| pairs | 20 | 20 (+0) |" in text and "![" not in text  # tables, no local images
    assert "report.md" in text and "WARNING parse_failures" in text


def test_cli_defaults_to_the_newest_run_and_strict_fails_on_a_warning(registry, capsys):
    assert cli_main(["report", "--registry", str(registry), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "run run-new" in out and "WARNING length_drift" in out and "--strict: 2 monitor warning(s)" in out
    assert cli_main(["report", "run-old", "--registry", str(registry), "--strict"]) == 0  # healthy, one iteration
    assert "run run-old" in capsys.readouterr().out
    assert (registry / "runs" / "run-old" / "report.md").is_file()


def test_cli_errors_name_what_is_wrong(registry, tmp_path, capsys):
    assert cli_main(["report", "no-such-run", "--registry", str(registry)]) == 2
    out = capsys.readouterr().out
    assert "no run 'no-such-run'" in out and "run-new" in out
    assert cli_main(["report", "--registry", str(tmp_path / "nowhere")]) == 2
    assert "no registry at" in capsys.readouterr().out
    Registry(tmp_path / "empty").close()
    assert cli_main(["report", "--registry", str(tmp_path / "empty")]) == 2
    assert "holds no runs yet" in capsys.readouterr().out


def test_an_iteration_still_running_renders_with_gaps(tmp_path):
    run = build_run(tmp_path, [HEALTHY])
    with Registry(tmp_path) as reg:
        reg.start_iteration(run, 2, "M2-model")
        add_stage(reg, run, 2, "self_instruct")  # started, nothing written yet; no generate, judge, pairs or trainer
        its, checks, path = write(reg, run)
    two = its[1]
    assert (two["iteration"], two["status"], two["prompts_made"], two["candidates"], two["pairs"]) == (2, "running", 0,
                                                                                                      None, None)
    assert two["model_out"] is None and two["delta"]["mean_score"] is None
    assert {c.status for c in checks if c.iteration == 2} == {"n/a"}
    text = path.read_text()
    assert "| candidates | 80 | - |" in text and "scores-2.png" not in text
    assert (path.parent / "curves.png").read_bytes().startswith(PNG_MAGIC)


# --- example pairs ---------------------------------------------------------------------------------------------------
FENCED = ("Use a fence:\n```python\nprint('`x`')\n```\nor four: ````\n# not a heading\n**bold** <b>html</b> "
          "[bold]x[/bold]\n| a | b |\n|---|---|\n~~~")
LONG = " ".join(f"word{i}" for i in range(80))  # 509 characters: cut on the terminal, whole in report.md
PROB = '{"probs":[0.01,0.02,0.05,0.1,0.32,0.5],"mass":0.93}'  # a judge sample in probability mode (judge.mode prob)


def _side(text: str, samples: list, coherent: float | None) -> dict:
    """One side of a pair: its text, its judge samples (score, or (raw text, score); None = a parse failure)."""
    raws = [(s if isinstance(s, tuple) else ("I cannot tell." if s is None else f"Judged on the rubric. Score: {s}", s))
            for s in samples]
    return dict(text=text, samples=raws, coherent=coherent)


def _pair(prompt: str, margin: float, chosen: dict, rejected: dict, weights: dict) -> dict:
    return dict(prompt=prompt, margin=margin, chosen=chosen, rejected=rejected, weights=weights)


JUDGE_AND_COHERENT = {"coherent": 0.5, "judge": 1.0}
# iteration 1: six pairs, by margin p4 0.5, p0 1, p2 2, p5 2 (ties p2: the id decides), p1 3, p3 4.5
EXAMPLES_RUN = {
    1: [_pair("task 0", 1.0, _side("zero good", [4, 4, 4], 0.1), _side("zero weak", [3, 3, 3], 0.0),
              JUDGE_AND_COHERENT),
        _pair("task 1", 3.0, _side("one good", [5, 5, 5], 0.2), _side("one weak", [1, 1, 2], 0.0), JUDGE_AND_COHERENT),
        _pair("task 2", 2.0, _side(LONG, [(PROB, 4.27), 4, 4], 0.3), _side("two weak", [2, 2, 2], -0.5),
              JUDGE_AND_COHERENT),
        _pair("Explain `code` fences:\n> quoted # and ```", 4.5, _side(FENCED, [None, 5, 4], 0.25),
              _side("three weak", [0, 0, 1], -1.5), JUDGE_AND_COHERENT),
        _pair("task 4", 0.5, _side("four good", [3, 3, 4], 0.0), _side("# four\n[bold]weak[/bold]", [3, 3, 3], 0.0),
              JUDGE_AND_COHERENT),
        _pair("task 5", 2.0, _side("five good", [4, 4, 4], 0.4), _side("five weak", [2, 2, 3], 0.1),
              JUDGE_AND_COHERENT)],
    # iteration 2: one pair chosen by the coherent reward alone; the judge ran for the report (weight 0) and could not
    # score the rejected answer
    2: [_pair("task 0", 1.25, _side("alone good", [4, 4], 0.75), _side("alone weak", [None, None], -0.5),
              {"coherent": 1.0})],
    # iteration 3: no judge stage; two pairs chosen by the coherent reward
    3: [_pair("task 0", 1.0, _side("reward-only good", [], 0.75), _side("reward-only weak", [], -0.25),
              {"coherent": 1.0}),
        _pair("task 1", 0.5, _side("reward-only fine", [], 0.5), _side("reward-only poor", [], 0.0),
              {"coherent": 1.0})],
}


def build_examples_run(root, run_id: str = "run-ex") -> str:
    """A run whose pairs are written here one by one (EXAMPLES_RUN): per pair, the prompt, the chosen and rejected
    texts, their judge samples and coherent rewards; the pair's scores are +-margin/2 when the judge is weighted (a
    weighted sum, as pairs.py makes it) and the coherent reward when it alone is."""
    with Registry(root) as reg:
        reg.start_run(run_id, "ex", "h", {"run": {"name": "ex"}})
        for t, pairs in EXAMPLES_RUN.items():
            reg.start_iteration(run_id, t, "m")
            common = dict(run_id=run_id, iteration=t, created_at=now())
            judged = any(side["samples"] for p in pairs for side in (p["chosen"], p["rejected"]))
            si, gen, pr = (add_stage(reg, run_id, t, s) for s in ("self_instruct", "generate", "pairs"))
            jd = add_stage(reg, run_id, t, "judge") if judged else None
            prompts, cands, judgments, rows = [], [], [], []
            for p, spec in enumerate(pairs):
                pid = f"{run_id}-p{t}-{p}"
                prompts.append(prompt_row(pid, spec["prompt"], si, **common))
                ids, raw = {}, {}
                for side in ("chosen", "rejected"):
                    s = spec[side]
                    cid = ids[side] = f"{run_id}-c{t}-{p}-{side}"
                    cands.append(candidate_row(cid, pid, s["text"], gen, sample_index=len(cands),
                                               num_tokens=len(s["text"].split()), **common))
                    judgments += [judgment_row(cid, k, v, jd, judgment_id=f"j-{cid}-{k}", raw_text=text, **common)
                                  for k, (text, v) in enumerate(s["samples"])]
                    valid = [v for _, v in s["samples"] if v is not None]
                    raw[side] = {"coherent": s["coherent"], **({"judge": sum(valid) / len(valid)}
                                                               if valid and "judge" in spec["weights"] else {})}
                if "judge" in spec["weights"]:
                    scores = (spec["margin"] / 2, -spec["margin"] / 2)
                else:
                    scores = (spec["chosen"]["coherent"], spec["rejected"]["coherent"])
                rows.append(dict(pair_id=f"ex-pr-{t}-{p}", prompt_id=pid, chosen_id=ids["chosen"],
                                 rejected_id=ids["rejected"], chosen_score=scores[0], rejected_score=scores[1],
                                 signals={"weights": spec["weights"], "rho": 0.0, **raw}, stage_run_id=pr,
                                 config_hash="h", **common))
            for table, new in (("prompts", prompts), ("candidates", cands), ("judgments", judgments), ("pairs", rows)):
                insert_rows(reg, table, new)
            reg.finish_iteration(run_id, t, f"m{t}")
        reg.finish_run(run_id)
    return run_id


@pytest.fixture(scope="module")
def examples_registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    build_examples_run(root)
    return root


def _expected(t: int, p: int, role: str) -> dict:
    """The example EXAMPLES_RUN[t][p] should give, from the rows written."""
    spec = EXAMPLES_RUN[t][p]
    judged = any(side["samples"] for q in EXAMPLES_RUN[t] for side in (q["chosen"], q["rejected"]))
    sides = {}
    for side in ("chosen", "rejected"):
        s = spec[side]
        valid = [(k, text, v) for k, (text, v) in enumerate(s["samples"]) if v is not None]
        pick = valid[0] if valid else ((0, *s["samples"][0]) if s["samples"] else (None, None, None))
        sides[side] = dict(text=s["text"], judge_mean=sum(v for *_, v in valid) / len(valid) if valid else None,
                           judge_valid=len(valid) if judged else None, judge_samples=len(s["samples"]) or None,
                           rationale_sample=pick[0], rationale=pick[1], rationale_score=pick[2],
                           signals={"coherent": s["coherent"]})
    return dict(role=role, pair_id=f"ex-pr-{t}-{p}", prompt=spec["prompt"], margin=spec["margin"], judged=judged,
                **sides)


def _strip(ex: dict) -> dict:
    """An example's fields that _expected states (candidate ids, tokens, scores and weights are checked apart)."""
    keep = ("text", "judge_mean", "judge_valid", "judge_samples", "rationale_sample", "rationale", "rationale_score",
            "signals")
    return dict({k: ex[k] for k in ("role", "pair_id", "prompt", "margin", "judged")},
                **{side: {k: ex[side][k] for k in keep} for side in ("chosen", "rejected")})


def test_example_pairs_are_the_largest_median_and_smallest_margin(examples_registry):
    with Registry(examples_registry) as reg:
        one, two, three = collect(reg, "run-ex")
    # six pairs ordered by (margin, id): p4 0.5, p0 1, p2 2, p5 2, p1 3, p3 4.5; the median is the 3rd: p2, not p5
    assert [_strip(ex) for ex in one["examples"]] == [_strip(_expected(1, 3, "largest margin")),
                                                       _strip(_expected(1, 2, "median margin")),
                                                       _strip(_expected(1, 4, "smallest margin"))]
    top = one["examples"][0]
    assert top["chosen"]["text"] == FENCED and top["margin"] == 4.5
    assert top["chosen"]["judge_mean"] == 4.5 and top["chosen"]["rationale"] == "Judged on the rubric. Score: 5"
    assert top["chosen"]["rationale_sample"] == 1  # sample 0 had no verdict: the first valid one is shown
    assert (top["chosen"]["score"], top["rejected"]["score"]) == (2.25, -2.25)  # the weighted sum pairs chose by
    assert top["chosen"]["signals"] == {"coherent": 0.25} and top["weights"] == JUDGE_AND_COHERENT  # judge: apart
    assert top["chosen"]["candidate_id"] == "run-ex-c1-3-chosen" and top["rejected"]["tokens"] == 2
    median = one["examples"][1]
    assert median["chosen"]["rationale"] == PROB and median["chosen"]["judge_mean"] == pytest.approx(12.27 / 3)
    # one pair: one example; the judge ran but found no verdict for the rejected: its first sample's raw text
    assert [_strip(ex) for ex in two["examples"]] == [_strip(_expected(2, 0, "only pair"))]
    unscored = two["examples"][0]["rejected"]
    assert unscored["rationale"] == "I cannot tell." and unscored["judge_mean"] is None
    # no judge stage: the pairs with their signals only
    assert [_strip(ex) for ex in three["examples"]] == [_strip(_expected(3, 0, "largest margin")),
                                                         _strip(_expected(3, 1, "smallest margin"))]
    assert all(ex[side]["judge_mean"] is None and ex[side]["rationale"] is None and not ex["judged"]
               for ex in three["examples"] for side in ("chosen", "rejected"))
    with Registry(examples_registry) as reg:  # read-only, and nothing without a pairs stage
        assert example_pairs(reg, None, None) == []


def test_example_pairs_in_report_md_and_json(examples_registry):
    with Registry(examples_registry) as reg:
        its, _, path = write(reg, "run-ex")
    text = path.read_text()
    tokens = MarkdownIt("commonmark").parse(text)
    fences = [tok.content for tok in tokens if tok.type == "fence"]
    headings = [tokens[i + 1].content for i, tok in enumerate(tokens) if tok.type == "heading_open"]
    # every text is one fenced block holding exactly that text, backticks, Markdown and all
    for it in its:
        for ex in it["examples"]:
            assert ex["prompt"] + "\n" in fences
            for side in ("chosen", "rejected"):
                assert ex[side]["text"] + "\n" in fences
                if ex[side]["rationale"] is not None:
                    assert ex[side]["rationale"] + "\n" in fences
    assert FENCED + "\n" in fences and LONG + "\n" in fences and PROB + "\n" in fences
    assert "`````text\n" + FENCED + "\n`````" in text  # four backticks in the text: a fence of five
    # no fence ran on: every heading after the texts is a heading, in order
    assert [h for h in headings if h.startswith(("Example pairs", "Largest", "Median", "Smallest", "Only"))] == [
        "Example pairs, iteration 1", "Largest margin 4.50 (pair `ex-pr-1-3`)",
        "Median margin 2.00 (pair `ex-pr-1-2`)", "Smallest margin 0.50 (pair `ex-pr-1-4`)",
        "Example pairs, iteration 2", "Only pair, margin 1.25 (pair `ex-pr-2-0`)",
        "Example pairs, iteration 3", "Largest margin 1.00 (pair `ex-pr-3-0`)",
        "Smallest margin 0.50 (pair `ex-pr-3-1`)"]
    assert "**Chosen** (judge mean 4.50 over 2 valid of 3 samples; coherent 0.25; pair score 2.25)" in text
    assert "Judge sample 1 (score 5):" in text and "Judge sample 0 (no verdict):" in text
    assert "**Rejected** (judge mean - over 0 valid of 2 samples; coherent -0.5; pair score -0.5)" in text
    third = text[text.index("#### Example pairs, iteration 3"):]
    assert "The judge did not run in this iteration: signals only." in third
    assert "**Chosen** (coherent 0.75; pair score 0.75)" in third and "udge" not in third.split("signals only.")[1]
    saved = json.loads((path.parent / "report.json").read_text())["iterations"]
    assert [len(it["examples"]) for it in saved] == [3, 1, 2]
    assert saved[0]["examples"][0]["chosen"]["text"] == FENCED and saved[0]["examples"][1]["chosen"]["text"] == LONG
    assert saved[0]["examples"][1]["chosen"]["rationale"] == PROB
    with Registry(examples_registry) as reg:
        assert FENCED in markdown(reg, "run-ex")  # the Prefect artifact too


def test_example_pairs_on_the_terminal(examples_registry):
    with Registry(examples_registry) as reg:
        its = collect(reg, "run-ex")
    console = Console(record=True, width=2000)  # wide enough that no cell folds: each text on one line
    print_report("run-ex", its, evaluate(its), console)
    text = console.export_text()
    one, two, three = (text[text.index(f"example pairs, iteration {t}"):] for t in (1, 2, 3))
    assert "example pairs, iteration 1 (3 of 6 pairs)" in one and "example pairs, iteration 2 (1 of 1 pairs)" in two
    assert LONG[:200] in one and LONG not in text  # cut to CLIP characters, with an ellipsis
    assert LONG[: CLIP - 1].rstrip() + "…" in one
    assert "Use a fence: ```python print('`x`') ``` or four:" in one  # one line per text, as written
    assert "# four [bold]weak[/bold]" in one  # not taken for rich markup
    assert "judge mean 4.50 over 2 valid of 3 samples; coherent 0.25; pair score 2.25" in one
    assert "judge sample 1 (score 5): Judged on the rubric. Score: 5" in one
    assert "judge sample 0 (score 4.27): " + PROB in one
    assert "judge sample 0 (no verdict): I cannot tell." in two and "only pair, margin 1.25" in two
    assert "largest margin 1.00" in three and "coherent 0.75; pair score 0.75" in three
    assert "judge" not in three.split("monitors")[0]


def test_a_failed_run_says_so_where_and_why(tmp_path, capsys):
    run_id = build_run(tmp_path, [HEALTHY])
    with Registry(tmp_path) as reg:
        sid = add_stage(reg, run_id, 2, "judge")
        reg.fail_stage(sid, "ValueError: the judge template has no {response}\nTraceback ...")
        reg.finish_run(run_id, "failed")
        text = markdown(reg, run_id)
    assert "This run FAILED: it stopped in judge (iteration 2): ValueError: the judge template has no {response}" in text
    assert cli_main(["report", "--registry", str(tmp_path)]) == 0
    assert "This run FAILED" in capsys.readouterr().out
    assert "This run FAILED" in (tmp_path / "runs" / run_id / "report.md").read_text()
    with Registry(tmp_path) as reg:
        reg.finish_run(run_id, "done")
        assert "FAILED" not in markdown(reg, run_id)
