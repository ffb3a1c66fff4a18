"""`flywheel browse` in a real browser: headless Chromium (the system package, see .ci/run) driven over the Chrome
DevTools protocol with the `websockets` package. Pages are read from the DOM the browser rendered; the label is
added by filling and submitting the pair page's form in the browser. The registry is a real DuckDB file written by
tests/helpers/registry.py; the pairs the browser shows are compared with SQL on that file.

FLYWHEEL_BROWSE_SHOTS=docs/browse writes the screenshots of the three views there as well.
"""

from __future__ import annotations

import getpass
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from flywheel.analysis import report
from flywheel.browse.server import check_host, make_server, serve_in_thread
from flywheel.cli import main as cli_main
from flywheel.registry import reader
from flywheel.registry.lock import registry_lock
from tests.helpers.registry import build_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,  # a browser and a server
              pytest.mark.skipif(CHROMIUM is None, reason="the chromium binary is not installed "
                                 "(apt-get install chromium; .ci/run installs it)")]
RUN = "run-a"


def scores(p: int, j: int) -> list:
    """Chosen is candidate 0, rejected 1; the samples of some disagree; (2, 0)'s second sample fails to parse."""
    base = {0: 5 - (p % 4) * 0.5, 1: 1 + (p % 3) * 0.5}.get(j, 3)
    return [base, None if (p, j) == (2, 0) else base - (p % 2)]


def tokens(p: int, j: int) -> int:
    return 10 + (p * 7 + j * 5) % 13


def text(p: int, j: int, t: int) -> str:
    return f"answer {p}-{j} the quick brown fox" + (" banana" if p % 5 == 0 else "") + (" extra" if j == 0 else "")


# --- a headless Chromium over the DevTools protocol ---------------------------------------------------------------
class Browser:
    """One headless Chromium and one tab; `goto(url)`, `js(expression)` (its JSON value), `screenshot(path)`."""

    def __init__(self, profile: Path):
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--remote-debugging-port=0",
             "--window-size=1400,1000", "--hide-scrollbars", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if "DevTools listening on " in line:
                port = urllib.parse.urlsplit(line.split("DevTools listening on ")[1].strip()).port
                break
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
        else:
            raise RuntimeError("chromium did not open its DevTools port within 60 s")
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_loaded(self, url_part: str = "") -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.js(f"document.readyState === 'complete' && location.href.includes({json.dumps(url_part)})"):
                return
            time.sleep(0.05)
        raise TimeoutError(f"page {url_part} did not load: at {self.js('location.href')}")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_loaded(urllib.parse.urlsplit(url).path)

    def screenshot(self, path: Path) -> None:
        import base64

        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


# --- fixtures -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browse") / "registry"
    build_run(root, [dict(tokens=tokens, scores=scores, text=text, prompts=12, n=3)], run_id=RUN)
    return root


@pytest.fixture(scope="module")
def server(root):
    srv = make_server(root, "127.0.0.1", 0, read_wait_s=1.0)
    serve_in_thread(srv)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def base(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def browser():
    with tempfile.TemporaryDirectory() as profile:
        b = Browser(Path(profile))
        yield b
        b.close()


def expected_pairs(root: Path) -> list[dict]:
    """The iteration's pairs straight from the registry, with margin, lengths, spread and texts."""
    with reader(root) as reg:
        rows = reg.rows("SELECT pr.pair_id, pr.chosen_score - pr.rejected_score AS margin, pr.chosen_id, "
                        "pr.rejected_id, ch.num_tokens AS ct, rj.num_tokens AS rt, p.text || ch.text || rj.text AS t "
                        "FROM pairs pr JOIN prompts p USING (prompt_id) JOIN candidates ch ON "
                        "ch.candidate_id = pr.chosen_id JOIN candidates rj ON rj.candidate_id = pr.rejected_id "
                        "WHERE pr.run_id = ? AND pr.iteration = 1", [RUN])
        samples: dict[str, list] = {}
        for j in reg.rows("SELECT candidate_id, score FROM judgments WHERE score IS NOT NULL"):
            samples.setdefault(j["candidate_id"], []).append(j["score"])
    for r in rows:
        r["spread"] = max(max(samples[c]) - min(samples[c]) for c in (r["chosen_id"], r["rejected_id"]))
    return rows


def shown(browser: Browser, base: str, query: str) -> tuple[list[tuple[str, float]], str]:
    """(pair id, margin) of each row of the pairs table the browser rendered, and the paging line."""
    browser.goto(f"{base}/run/{RUN}/1?{query}")
    rows = browser.js("[...document.querySelectorAll('#pairs tbody tr')]"
                      ".map(tr => [tr.dataset.pair, tr.querySelector('.margin').innerText])")
    return [(p, float(m)) for p, m in rows], browser.js("document.getElementById('paging').innerText")


def ids(rows: list[dict]) -> list[tuple[str, float]]:
    return [(r["pair_id"], round(r["margin"], 4)) for r in rows]


# --- tests --------------------------------------------------------------------------------------------------------
def test_pairs_table_matches_registry_under_sorts_filters_search_and_pages(root, base, browser):
    pairs = expected_pairs(root)
    assert len(pairs) == 12
    by_margin = sorted(pairs, key=lambda r: (-r["margin"], r["pair_id"]))

    rows, paging = shown(browser, base, "sort=-margin&size=5")
    assert rows == ids(by_margin[:5]) and "12 pairs; page 1 of 3" in paging
    rows, paging = shown(browser, base, "sort=-margin&size=5&page=3")  # the last page
    assert rows == ids(by_margin[10:]) and "page 3 of 3" in paging

    rows, _ = shown(browser, base, "sort=ratio&size=50")
    assert rows == ids(sorted(pairs, key=lambda r: (r["ct"] / r["rt"], r["pair_id"])))

    rows, paging = shown(browser, base, "sort=margin&min_margin=2.5&longer=chosen")
    want = sorted((r for r in pairs if r["margin"] >= 2.5 and r["ct"] > r["rt"]), key=lambda r: (r["margin"],
                                                                                                r["pair_id"]))
    assert want and rows == ids(want) and f"{len(want)} pairs" in paging

    rows, _ = shown(browser, base, "sort=-spread&min_spread=0.5")
    want = sorted((r for r in pairs if r["spread"] >= 0.5), key=lambda r: (-r["spread"], r["pair_id"]))
    assert want and rows == ids(want)

    rows, paging = shown(browser, base, "q=BANANA&sort=pair")
    want = sorted((r for r in pairs if "banana" in r["t"]), key=lambda r: r["pair_id"])
    assert len(want) == 3 and rows == ids(want) and "3 pairs; page 1 of 1" in paging

    rows, _ = shown(browser, base, "q=%3Cscript%3E")  # text search with markup: nothing, and nothing breaks
    assert rows == []
    shown(browser, base, "min_margin=abc")
    assert "min_margin: not a number" in browser.js("document.body.innerText")


def test_pair_page_shows_both_texts_and_every_judge_sample(root, base, browser):
    pair = "run-a-pr-1-2"  # its chosen's second judge sample failed to parse
    browser.goto(f"{base}/pair/{pair}")
    with reader(root) as reg:
        p = reg.rows("SELECT * FROM pairs WHERE pair_id = ?", [pair])[0]
        texts = {c["candidate_id"]: c["text"] for c in reg.rows("SELECT candidate_id, text FROM candidates")}
        judgments = reg.rows("SELECT candidate_id, raw_text, score, parse_error FROM judgments WHERE candidate_id IN "
                             "(?, ?) ORDER BY candidate_id, sample_index", [p["chosen_id"], p["rejected_id"]])
    assert browser.js("document.getElementById('chosen-text').innerText") == texts[p["chosen_id"]]
    assert browser.js("document.getElementById('rejected-text').innerText") == texts[p["rejected_id"]]
    assert browser.js("document.querySelector('#chosen-text mark.del').innerText").strip() in ("2-0", "extra")
    cells = browser.js("[...document.querySelectorAll('table.judgments tbody tr')].map(tr => "
                       "[...tr.cells].slice(1, 3).map(td => td.innerText.trim()))")
    assert len(cells) == len(judgments) == 4
    for (verdict, raw), j in zip(cells, judgments):
        assert raw == j["raw_text"]
        assert verdict == (f"{j['score']:g}" if j["score"] is not None else f"parse failure: {j['parse_error']}")
    page = browser.js("document.body.innerText")
    assert "trained into" in page and "M2 (dpo, iteration 1)" in page and "task 2" in page
    # every id links to its lineage page, which the browser renders
    browser.goto(f"{base}/id/{p['chosen_id']}")
    assert p["chosen_id"] in browser.js("document.title") and pair in browser.js("document.body.innerText")
    browser.goto(f"{base}/id/{pair}")
    assert "Lineage of pair" in browser.js("document.title")


def test_label_form_writes_a_row_with_who_and_when_and_feeds_agreement(root, base, browser):
    pair = "run-a-pr-1-4"
    browser.goto(f"{base}/pair/{pair}")
    assert browser.js("document.getElementById('labels').innerText") == "No labels yet."
    browser.js("document.querySelector('input[name=note]').value = 'too <b>short</b>';"
               "document.getElementById('who').value = 'alice';"
               "document.querySelector('button[value=flag]').click()")
    browser.wait_loaded("saved=")
    assert browser.js("document.getElementById('message').innerText") == "saved: flag by alice"
    shown_labels = browser.js("[...document.querySelectorAll('#labels tbody tr')].map(tr => tr.innerText)")
    assert len(shown_labels) == 1 and "flag" in shown_labels[0] and "too <b>short</b>" in shown_labels[0]
    with reader(root) as reg:
        rows = reg.rows("SELECT * FROM pair_labels")
    assert len(rows) == 1 and rows[0]["pair_id"] == pair and rows[0]["who"] == "alice"
    assert rows[0]["label"] == "flag" and rows[0]["note"] == "too <b>short</b>"
    assert abs(time.time() - rows[0]["created_at"].timestamp()) < 300

    # no name: the OS user; labels feed the judge-vs-human agreement (flags left out)
    for pid, label in (("run-a-pr-1-5", "agree"), ("run-a-pr-1-6", "disagree"), ("run-a-pr-1-6", "agree"),
                       ("run-a-pr-1-7", "disagree")):
        assert post(base, pid, label=label).status == 200  # after the redirect to the pair page
    with reader(root) as reg:
        assert reg.scalar("SELECT count(*) FROM pair_labels WHERE who = ?", [getpass.getuser()]) == 4
        it = report.collect(reg, RUN)[0]
    assert it["human_labels"] == {"agree": 2, "disagree": 1, "flag": 1}  # 1-6: the latest label, agree
    assert it["human_agreement"] == round(2 / 3, 4)
    browser.goto(f"{base}/run/{RUN}")
    assert "67% agree" in browser.js("document.getElementById('iterations').innerText")

    with pytest.raises(urllib.error.HTTPError) as e:
        post(base, pair, label="maybe")
    assert e.value.code == 400
    with pytest.raises(urllib.error.HTTPError) as e:
        post(base, pair, label="agree", headers={"Origin": "http://evil.example"})
    assert e.value.code == 403


def post(base: str, pair_id: str, headers: dict | None = None, **form):
    data = urllib.parse.urlencode(form).encode()
    return urllib.request.urlopen(urllib.request.Request(f"{base}/pair/{pair_id}/label", data=data,
                                                         headers=headers or {}), timeout=60)


def label_count(root: Path) -> int:
    with reader(root) as reg:
        return reg.scalar("SELECT count(*) FROM pair_labels")


def test_binds_only_what_it_was_told_and_reads_while_a_run_holds_the_registry(root, server, base, browser):
    host, port = server.server_address
    assert host == "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outward interface's address
        outward = s.getsockname()[0]
    assert not outward.startswith("127.")
    with pytest.raises(OSError):
        socket.create_connection((outward, port), timeout=5).close()
    for bad in ("", "example.com"):
        with pytest.raises(ValueError):
            check_host(bad)

    before = label_count(root)
    with registry_lock(root, "nightly-run"):  # a run holds the registry
        rows, _ = shown(browser, base, "sort=-margin&size=3")
        assert len(rows) == 3
        browser.goto(f"{base}/pair/run-a-pr-1-3")
        browser.js("document.querySelector('button[value=agree]').click()")
        browser.wait_loaded("/label")
        message = browser.js("document.getElementById('message').innerText")
        assert message.startswith("registry busy, try again") and "nightly-run" in message
    assert label_count(root) == before

    # another process writing the DuckDB file itself: pages say busy at once instead of hanging, labels too
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(60)", str(root / "flywheel.duckdb")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{base}/run/{RUN}/1", timeout=30)
        assert e.value.code == 503 and "registry busy" in e.value.read().decode()
        assert time.monotonic() - started < 10
        with pytest.raises(urllib.error.HTTPError) as e:
            post(base, "run-a-pr-1-3", label="agree")
        assert e.value.code == 409 and "registry busy, try again" in e.value.read().decode()
    finally:
        holder.kill()
        holder.wait()
    assert label_count(root) == before
    assert urllib.request.urlopen(f"{base}/run/{RUN}/1", timeout=30).status == 200


def test_export_argilla_records(root, tmp_path):
    out = tmp_path / "argilla"
    assert cli_main(["browse", "--registry", str(root), "--export-argilla", f"{RUN}:1", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    pairs = {r["pair_id"]: r for r in expected_pairs(root)}
    assert sorted(r["id"] for r in records) == sorted(pairs)
    r = records[0]
    assert set(r) == {"id", "fields", "metadata", "suggestions", "responses", "vectors"}
    assert set(r["fields"]) == {"prompt", "chosen", "rejected"} and r["fields"]["chosen"].startswith("answer")
    assert r["metadata"]["pair_id"] == r["id"] and r["metadata"]["margin"] == pytest.approx(pairs[r["id"]]["margin"])
    assert r["suggestions"]["preference"]["value"] == "chosen"
    import pyarrow.parquet as pq

    assert pq.read_table(out / "records.parquet").num_rows == len(pairs)
    settings = json.loads((out / "settings.json").read_text())
    assert [f["name"] for f in settings["fields"]] == ["prompt", "chosen", "rejected"]
    assert cli_main(["browse", "--registry", str(root), "--export-argilla", "nope:9", "--out", str(out)]) == 2


def test_screenshots_of_the_three_views(root, base, browser, tmp_path):
    shots = {"runs-and-iterations.png": f"/run/{RUN}", "pairs.png": f"/run/{RUN}/1?sort=-margin&size=8",
             "pair.png": f"/pair/{RUN}-pr-1-2"}
    keep = os.environ.get("FLYWHEEL_BROWSE_SHOTS")
    for name, path in shots.items():
        browser.goto(base + path)
        browser.screenshot(tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / name, Path(keep) / name)
