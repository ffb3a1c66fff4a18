"""The openai backend over real HTTP on 127.0.0.1, against `flywheel serve`'s app running a tiny random model.

What the real server never does on purpose (rate-limit, fail, hang, echo a secret) comes from `FlakyStandIn`, a thin
OpenAI-shaped FastAPI app that follows a script and then proxies to the real server (or answers canned choices).
Last, the real generate stage runs with generate.backend=openai against the server on a tiny registry.
"""

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from flywheel.backends import BackendError, OpenAIBackend, SamplingParams, TransformersBackend, release_backends
from flywheel.backends.generation import prompt_seed
from flywheel.backends.serve import create_app, serving
from flywheel.config import ConfigError, OpenAIBackendConfig

pytestmark = pytest.mark.slow  # real HTTP servers with a tiny model behind them; `flywheel serve` in a subprocess

PROMPTS = ["What is a noun?", "List three colours.", "Explain why ice floats on water, briefly please."]
KEY = "sk-flywheel-test-4f9c2a7e"
KEY_ENV = "FLYWHEEL_TEST_API_KEY"


@pytest.fixture(scope="module")
def model_path(tiny_model_path):
    return str(tiny_model_path)


@pytest.fixture(scope="module")
def server(model_path):
    with serving(create_app(models=[model_path])) as url:
        yield url


def openai_backend(url: str, model: str, **cfg) -> OpenAIBackend:
    return OpenAIBackend(model, OpenAIBackendConfig(base_url=url, api_key_env=KEY_ENV, **cfg))


class FlakyStandIn:
    """A clearly fake OpenAI-compatible server. Each request takes the next action of `script`: '429' (with
    Retry-After: 1), '503', 'slow' (answers after 1.5 s), 'echo-401' / 'echo-500' (an error body quoting the
    Authorization header back). With the script used up it answers: through `upstream` (the real server) when given,
    else with `canned(body)`, after `delay` seconds. It records every call and the most requests in flight at once."""

    def __init__(self, script=(), upstream=None, canned=None, delay=0.0):
        self.script, self.upstream, self.canned, self.delay = list(script), upstream, canned, delay
        self.calls, self.in_flight, self.max_in_flight = [], 0, 0
        self.app = FastAPI()
        self.app.post("/v1/completions")(self.handle)
        self.app.post("/v1/chat/completions")(self.handle)

    async def handle(self, request: Request):
        body = await request.json()
        auth = request.headers.get("authorization")
        self.calls.append({"t": time.monotonic(), "auth": auth, "body": body, "path": request.url.path})
        action = self.script.pop(0) if self.script else "answer"
        if action == "429":
            return JSONResponse({"error": {"message": "rate limited"}}, 429, headers={"Retry-After": "1"})
        if action == "503":
            return JSONResponse({"error": {"message": "overloaded"}}, 503)
        if action.startswith("echo-"):
            return JSONResponse({"error": {"message": f"rejected credentials {auth}"}}, int(action[-3:]))
        if action == "slow":
            await asyncio.sleep(1.5)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if self.upstream:
                async with httpx.AsyncClient(timeout=60) as client:
                    r = await client.post(self.upstream + request.url.path.removeprefix("/v1"), json=body)
                return JSONResponse(r.json(), r.status_code)
            return self.canned(body)
        finally:
            self.in_flight -= 1


def canned_ok(body: dict) -> dict:
    """n choices of "ok" (1 token each, finish 'stop'), reporting only a total token count as most servers do."""
    key = "message" if "messages" in body else "text"
    value = {"role": "assistant", "content": "ok"} if key == "message" else "ok"
    choices = [{"index": i, key: value, "finish_reason": "stop"} for i in range(body["n"])]
    return {"choices": choices, "usage": {"completion_tokens": body["n"]}}


# --- the real server ---------------------------------------------------------------------------------------------

def test_server_speaks_openai(server, model_path):
    models = httpx.get(f"{server}/models").json()
    assert [m["id"] for m in models["data"]] == [model_path]
    r = httpx.post(f"{server}/completions", json={"model": model_path, "prompt": ["a b", "c"], "n": 2, "max_tokens": 5,
                                                  "seed": 1})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == model_path and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]  # prompt by prompt, n each
    assert all(c["finish_reason"] in ("stop", "length") and isinstance(c["text"], str) for c in body["choices"])
    usage = body["usage"]
    assert usage["completion_tokens"] == sum(c["usage"]["completion_tokens"] for c in body["choices"]) > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["prompt_tokens"] > 0

    r = httpx.post(f"{server}/chat/completions", json={"model": model_path, "max_tokens": 4,
                                                       "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


def test_stop_strings_cut_the_text(server, model_path):
    req = {"model": model_path, "prompt": "The", "max_tokens": 12, "seed": 4, "temperature": 1.0}
    full = httpx.post(f"{server}/completions", json=req).json()["choices"][0]["text"]
    assert len(full) >= 4
    cut = httpx.post(f"{server}/completions", json={**req, "stop": [full[2:4]]}).json()["choices"][0]
    assert full.startswith(cut["text"]) and len(cut["text"]) <= 2 and cut["finish_reason"] == "stop"


def test_models_dir_serves_every_model_folder_one_at_a_time(model_path, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(model_path, root / "sft-a")
    shutil.copytree(model_path, root / "dpo-b")
    (root / "notes").mkdir()
    app = create_app(models_dir=root)
    with serving(app) as url:
        assert [m["id"] for m in httpx.get(f"{url}/models").json()["data"]] == [str(root / "dpo-b"),
                                                                                 str(root / "sft-a")]
        for name, folder in ((str(root / "sft-a"), "sft-a"), ("dpo-b", "dpo-b"), ("elsewhere/models/sft-a", "sft-a")):
            r = httpx.post(f"{url}/completions", json={"model": name, "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["model"] == name
            assert app.state.store.loaded == (root / folder).resolve()  # the one model in memory
        for name in ("notes", str(root / ".." / "outside"), model_path, ""):
            r = httpx.post(f"{url}/completions", json={"model": name, "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_base_url_without_scheme_is_a_config_error():
    with pytest.raises(ConfigError, match="generate.openai.base_url must start with http:// or https://"):
        OpenAIBackend("m", OpenAIBackendConfig(base_url="127.0.0.1:8000/v1"))


@pytest.mark.parametrize("payload, status, param", [
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "stream": True}, 400, "stream"),
    ({"n": 1}, 400, "prompt"),
    ({"prompt": "x", "model": "no/such/model"}, 404, "model"),
])
def test_server_errors_are_openai_shaped(server, model_path, payload, status, param):
    r = httpx.post(f"{server}/completions", json={"model": model_path, **payload})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"] and err["type"] == "invalid_request_error"


def test_completions_and_chat_match_the_in_process_backend(server, model_path):
    """n per prompt, finish reasons and token counts as the transformers backend gives them for the same seeds."""
    local = TransformersBackend(model_path, "cpu")
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=6)
    backend = openai_backend(server, model_path, max_concurrency=2)
    for chat in (True, False):
        out = backend.generate(PROMPTS, params, seed=11, chat=chat)
        assert [len(o) for o in out] == [3, 3, 3]
        for i, prompt in enumerate(PROMPTS):
            assert out[i] == local.generate([prompt], params, seed=prompt_seed(11, i), chat=chat)[0]
        gens = [g for o in out for g in o]
        assert all(g.finish_reason == "stop" or (g.finish_reason == "length" and g.num_tokens == 6) for g in gens)
        assert any(g.finish_reason == "length" for g in gens)
        assert len({g.text for g in gens}) > 3
    backend.close()


def test_same_seed_same_texts(server, model_path):
    backend = openai_backend(server, model_path, max_concurrency=3)
    params = SamplingParams(n=2, temperature=1.0, top_p=0.9, max_new_tokens=8)
    a = backend.generate(PROMPTS, params, seed=7, chat=True)
    b = backend.generate(PROMPTS, params, seed=7, chat=True)
    c = backend.generate(PROMPTS, params, seed=8, chat=True)
    assert a == b and a != c


def test_unknown_model_is_a_clear_error(server):
    backend = openai_backend(server, "no/such/model", max_retries=3)
    with pytest.raises(BackendError) as e:
        backend.generate(["hi"], SamplingParams(n=2, max_new_tokens=4), seed=0, chat=True)
    msg = str(e.value)
    assert f"POST {server}/chat/completions -> HTTP 404" in msg and "'no/such/model' does not exist" in msg
    assert "generate.openai.model" in msg


# --- retries, limits and secrets, through the stand-in -------------------------------------------------------------

def test_retries_429_and_503_then_succeeds(server, model_path, caplog):
    flaky = FlakyStandIn(script=["429", "503"], upstream=server)
    with serving(flaky.app) as url, caplog.at_level(logging.WARNING, logger="flywheel"):
        backend = openai_backend(url, model_path, backoff_s=0.05, max_retries=3)
        out = backend.generate(PROMPTS[:1], SamplingParams(n=2, max_new_tokens=5), seed=3, chat=True)
    assert len(out[0]) == 2
    assert len(flaky.calls) == 3
    assert flaky.calls[1]["t"] - flaky.calls[0]["t"] >= 0.95  # Retry-After: 1 honoured (backoff alone is 0.05 s)
    assert flaky.calls[2]["t"] - flaky.calls[1]["t"] < 0.9  # then the exponential backoff (0.1 s)
    assert "HTTP 429" in caplog.text and "HTTP 503" in caplog.text and "retry 2/3" in caplog.text


def test_gives_up_after_max_retries_with_a_clear_error():
    flaky = FlakyStandIn(script=["503"] * 10, canned=canned_ok)
    with serving(flaky.app) as url:
        backend = openai_backend(url, "m", backoff_s=0.01, max_retries=2)
        with pytest.raises(BackendError) as e:
            backend.generate(["hi"], SamplingParams(n=1), seed=0, chat=False)
    assert str(e.value) == f"POST {url}/completions failed after 3 attempt(s); last error: HTTP 503: overloaded"
    assert len(flaky.calls) == 3


def test_timeouts_and_refused_connections_are_retried():
    flaky = FlakyStandIn(script=["slow"], canned=canned_ok)
    with serving(flaky.app) as url:
        out = openai_backend(url, "m", timeout_s=0.5, backoff_s=0.01).generate(["hi"], SamplingParams(n=2), seed=0,
                                                                                chat=True)
    assert [g.text for g in out[0]] == ["ok", "ok"] and len(flaky.calls) == 2

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(BackendError, match=r"failed after 2 attempt\(s\); last error: ConnectError"):
        openai_backend(dead, "m", max_retries=1, backoff_s=0.01).generate(["hi"], SamplingParams(n=1), seed=0,
                                                                          chat=True)


def test_concurrency_limit_is_respected():
    flaky = FlakyStandIn(canned=canned_ok, delay=0.2)
    with serving(flaky.app) as url:
        out = openai_backend(url, "m", max_concurrency=3).generate([f"p{i}" for i in range(10)], SamplingParams(n=1),
                                                                   seed=0, chat=False)
    assert len(out) == 10 and len(flaky.calls) == 10
    assert flaky.max_in_flight == 3


def test_request_fields_seeds_and_finish_reasons():
    def canned(body):
        choices = [{"index": 2, "text": " c ", "finish_reason": "eos_token"},
                   {"index": 0, "text": "aaaa", "finish_reason": "length"},
                   {"index": 1, "text": "bb", "finish_reason": "stop"}]
        return {"choices": choices, "usage": {"completion_tokens": 10 + 6}}

    flaky = FlakyStandIn(canned=canned)
    with serving(flaky.app) as url:
        backend = openai_backend(url, "served-name")
        out = backend.generate(["x", "y"], SamplingParams(n=3, temperature=0.5, top_p=0.8, max_new_tokens=10),
                               seed=42, chat=False)
    bodies = sorted((c["body"] for c in flaky.calls), key=lambda b: b["prompt"])
    assert bodies[0] == {"model": "served-name", "prompt": "x", "n": 3, "temperature": 0.5, "top_p": 0.8,
                         "max_tokens": 10, "seed": prompt_seed(42, 0)}
    assert bodies[1]["seed"] == prompt_seed(42, 1) != bodies[0]["seed"]
    gens = out[0]
    assert [(g.text, g.finish_reason) for g in gens] == [("aaaa", "length"), ("bb", "stop"), ("c", "stop")]
    # only a total came back: the cut choice counts max_tokens, the other 6 tokens are shared by text length
    assert [g.num_tokens for g in gens] == [10, 4, 2]


def test_fewer_choices_than_n_is_a_clear_error():
    flaky = FlakyStandIn(canned=lambda body: canned_ok({**body, "n": 1}))
    with serving(flaky.app) as url:
        with pytest.raises(BackendError, match=r"returned 1 choice\(s\) for n=4; the server may not support n > 1"):
            openai_backend(url, "m").generate(["hi"], SamplingParams(n=4), seed=0, chat=True)


def test_api_key_is_sent_as_bearer_and_never_shown(monkeypatch, caplog):
    flaky = FlakyStandIn(canned=canned_ok, script=["answer", "echo-401", "echo-500", "echo-500"])
    with serving(flaky.app) as url:
        backend = openai_backend(url, "m", max_retries=1, backoff_s=0.01)
        backend.generate(["hi"], SamplingParams(n=1), seed=0, chat=True)  # no key in the environment
        assert flaky.calls[-1]["auth"] is None

        monkeypatch.setenv(KEY_ENV, KEY)
        with caplog.at_level(logging.DEBUG):
            with pytest.raises(BackendError) as e401:
                backend.generate(["hi"], SamplingParams(n=1), seed=0, chat=True)
            with pytest.raises(BackendError) as e500:
                backend.generate(["hi"], SamplingParams(n=1), seed=0, chat=True)
    assert [c["auth"] for c in flaky.calls[1:]] == [f"Bearer {KEY}"] * 3
    assert "HTTP 401: rejected credentials Bearer ***" in str(e401.value)
    assert "HTTP 500: rejected credentials Bearer ***" in str(e500.value) and "retry 1/1" in caplog.text
    for text in (str(e401.value), str(e500.value), repr(e401.value), caplog.text, repr(backend), repr(backend.cfg)):
        assert KEY not in text


# --- the CLI and the generate stage -------------------------------------------------------------------------------

def test_flywheel_serve_command(model_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "serve", "--model", model_path, "--port", str(port),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        url, deadline = f"http://127.0.0.1:{port}/v1", time.monotonic() + 90
        while True:
            try:
                models = httpx.get(f"{url}/models").json()
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "flywheel serve did not come up"
                time.sleep(0.3)
        assert [m["id"] for m in models["data"]] == [model_path]
        out = openai_backend(url, model_path).generate(["hi"], SamplingParams(n=2, max_new_tokens=4), seed=1, chat=True)
        assert len(out[0]) == 2
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    assert f"Use it: generate.backend=openai generate.openai.base_url={url}" in log


def test_generate_stage_with_the_openai_backend(server, model_path, tmp_path):
    from flywheel.config import load_config
    from flywheel.registry import Registry, now
    from flywheel.stages.bootstrap import import_seeds
    from flywheel.stages.generate import generate

    seeds_file = tmp_path / "seeds.jsonl"  # 12 of the shipped seeds keep it quick
    seeds_file.write_text("".join(open("seeds/demo.jsonl").readlines()[:12]))
    cfg = load_config(None, [f"registry.root={tmp_path / 'reg'}", f"seeds.path={seeds_file}", "run.device=cpu",
                             "generate.backend=openai", f"generate.openai.base_url={server}",
                             "generate.openai.max_concurrency=4", "generate.n=2", "generate.temperature=0.8",
                             "generate.top_p=0.95", "generate.max_new_tokens=8", "generate.batch_size=4"])
    seeds = import_seeds(cfg, "run")
    with Registry(cfg.registry.root) as reg:  # the model's registered path is the name the server knows it by
        reg.register_model(model_id="m-test", run_id="run", name="M1", kind="sft", iteration=0, parent_id=None,
                           path=model_path, stage_run_id="test", config_hash="h", created_at=now())
    try:
        result = generate(cfg, "run", 1, "m-test", seeds.stage_run_id)
        again = generate(cfg, "run", 1, "m-test", seeds.stage_run_id)
    finally:
        release_backends()
    assert result.stats["candidates"] == 24 and result.stats["compute_s"] > 0  # 12 seed prompts x n
    assert again.skipped
    with Registry(cfg.registry.root) as reg:
        rows = reg.rows("SELECT backend, sampling, num_tokens, finish_reason, seed, text FROM candidates")
    assert len(rows) == 24 and {r["backend"] for r in rows} == {"openai"}
    sampling = {json.dumps(json.loads(r["sampling"]) if isinstance(r["sampling"], str) else r["sampling"],
                           sort_keys=True) for r in rows}
    assert sampling == {json.dumps({"n": 2, "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 8}, sort_keys=True)}
    assert all(0 <= r["num_tokens"] <= 8 and r["finish_reason"] in ("stop", "length") for r in rows)
    assert len({r["seed"] for r in rows}) == 3  # one seed per batch of 4 prompts
    assert len({r["text"] for r in rows}) > 12
