"""`flywheel serve` fit to expose: each guard against what a red-team did to it, over real HTTP on 127.0.0.1 (uvicorn in
a thread via `serving`, and `flywheel serve` in a subprocess for SIGTERM), on a tiny random model.

A generation that outlasts any limit here: n=64 choices of up to 60,000 tokens on a model with a 64k context. A random
model ends a choice with probability ~1/512 per token, and the request runs until all 64 have ended: ~60 s here.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from flywheel.backends.serve import ServeLimits, create_app, serving
from tests.helpers.models import save_random_tiny_model

KEY = "sk-serve-test-7c41e09b"
LONG = {"prompt": "hello", "n": 64, "max_tokens": 60000, "seed": 1}
http = httpx.Client(timeout=30)  # one client: a new one per call costs ~0.2 s


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """A tiny random model with a 64k context, so that only the server's limits cut a long generation."""
    return str(save_random_tiny_model(tmp_path_factory.mktemp("serve") / "tiny", max_position=1 << 16))


@pytest.fixture(scope="module")
def server(model):
    with serving(create_app(models=[model])) as url:
        yield url


def post(url: str, body: dict, path: str = "completions", **kw) -> httpx.Response:
    return http.post(f"{url}/{path}", json=body, **kw)


def error(r: httpx.Response, status: int, param: str | None = None) -> str:
    """The message of an OpenAI-shaped error with this status and param."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    return err["message"]


def wait_until(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@pytest.mark.parametrize("body, param", [
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": "abc"}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["x", ""]}, "prompt"),
    ({"temperature": 0, "n": 2}, "n"),
    ({"max_tokens": 10**9}, "max_tokens"),
    ({"prompt": ["x"] * 2000, "n": 128}, "n"),  # 256,000 sequences: 3.9 GB and counting before
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_bad_requests_are_400_naming_the_field(server, model, body, param):
    message = error(post(server, {"model": model, "prompt": "x", "max_tokens": 2, **body}), 400, param)
    assert message.startswith(param)


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10**9}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 3, "temperature": 0}, "n"),
])
def test_bad_chat_requests_are_400_naming_the_field(server, model, body, param):
    error(post(server, {"model": model, **body}, "chat/completions"), 400, param)


def test_prompt_tokens_are_limited_and_counted(model, tiny_model_path):
    words = "the cat sat on a mat " * 100  # ~600 tokens
    with serving(create_app(models=[model], limits=ServeLimits(max_prompt_tokens=64))) as url:
        assert "at most 64 per prompt" in error(post(url, {"model": model, "prompt": words}), 400, "prompt")
        chat = {"model": model, "messages": [{"role": "user", "content": words}]}
        assert "at most 64 per prompt" in error(post(url, chat, "chat/completions"), 400, "messages")
        t0 = time.monotonic()  # a 1 MB prompt: refused without tokenizing it (seconds of CPU)
        huge = error(post(url, {"model": model, "prompt": "word " * 200_000}), 400, "prompt")
        assert "more than 64 tokens" in huge and time.monotonic() - t0 < 2
        ok = post(url, {"model": model, "prompt": "the cat sat", "max_tokens": 2})
        assert ok.status_code == 200 and 0 < ok.json()["usage"]["prompt_tokens"] <= 64
    small = str(tiny_model_path)  # a 512-token context
    with serving(create_app(models=[small])) as url:
        assert "the model's context is 512" in error(post(url, {"model": small, "prompt": words}), 400, "prompt")
        fits = " ".join(words.split()[:300])  # leaves less room than max_tokens asks: cut to fit
        r = post(url, {"model": small, "prompt": fits, "max_tokens": 1000}).json()
        assert r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] <= 512


def test_body_size_is_limited_before_parsing(model):
    with serving(create_app(models=[model], limits=ServeLimits(max_body_bytes=4096))) as url:
        big = {"model": model, "prompt": "x" * 10_000}
        assert "4096 bytes" in error(post(url, big), 413)  # Content-Length says so
        chunks = iter([b'{"model": "m", "prompt": "', *[b"x" * 1000] * 10, b'"}'])  # no Content-Length: counted
        r = http.post(f"{url}/completions", content=chunks, headers={"content-type": "application/json"})
        error(r, 413)
        assert post(url, {"model": model, "prompt": "x", "max_tokens": 2}).status_code == 200
        host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:  # claims 300 MB, sends none: answered now
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 300000000\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 413")


def test_bearer_token_guards_every_endpoint(model, monkeypatch, capsys):
    with serving(create_app(models=[model], api_key=KEY)) as url:
        root = url.removesuffix("/v1")
        refused = [http.get(f"{url}/models"), http.get(f"{root}/docs"), http.get(f"{root}/openapi.json"),
                   http.get(f"{url}/models", headers={"Authorization": f"Bearer {KEY}x"}),
                   http.get(f"{url}/models", headers={"Authorization": f"Basic {KEY}"}),
                   post(url, {"model": model, "prompt": "x" * 2_000_000})]  # refused before its body is read
        for r in refused:
            assert "API key" in error(r, 401) and r.headers["www-authenticate"] == "Bearer"
            assert KEY not in r.text and KEY not in str(r.headers)
        auth = {"Authorization": f"Bearer {KEY}"}
        assert http.get(f"{url}/models", headers=auth).json()["data"][0]["id"] == model
        assert post(url, {"model": model, "prompt": "x", "max_tokens": 2}, headers=auth).status_code == 200

    from flywheel.cli import main

    monkeypatch.delenv("FLYWHEEL_TEST_UNSET_KEY", raising=False)
    assert main(["serve", "--model", model, "--api-key-env", "FLYWHEEL_TEST_UNSET_KEY"]) == 2
    out = capsys.readouterr().out
    assert "--api-key-env FLYWHEEL_TEST_UNSET_KEY: that environment variable is unset or empty" in out


def test_errors_show_no_server_paths(model, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(model, root / "good")
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{}")  # loading it fails: 500
    with serving(create_app(models_dir=root)) as url:
        for name in ("nope", "x" * 5000, "a\x00b", "../../etc"):
            r = post(url, {"model": name, "prompt": "x"})
            assert "GET /v1/models lists the served models" in error(r, 404, "model")
        failed = post(url, {"model": "broken", "prompt": "x"})
        unknown_route = http.get(f"{url}/nothing")
        assert "failed" in error(failed, 500) and "Not Found" in error(unknown_route, 404)
        for r in (failed, unknown_route, *(post(url, {"model": n, "prompt": "x"}) for n in ("nope", "good/.."))):
            assert str(tmp_path) not in r.text and str(Path(model).parent) not in r.text


def test_one_generation_at_a_time_with_a_bounded_queue_and_a_time_limit(model):
    """A long generation is stopped at the time limit (504), the request queued behind it then runs, and one past the
    queue is refused at once (429 with Retry-After)."""
    app = create_app(models=[model], limits=ServeLimits(max_queue=1, timeout_s=2, max_tokens=60000))
    line, results = app.state.line, {}

    def send(name: str, body: dict) -> None:
        t0 = time.monotonic()
        r = post(url, {"model": model, **body})
        results[name] = (r, time.monotonic() - t0)

    with serving(app) as url:
        assert post(url, {"model": model, "prompt": "x", "max_tokens": 2}).status_code == 200  # loads the model
        long = threading.Thread(target=send, args=("long", LONG))
        long.start()
        wait_until(lambda: len(line) == 1)
        queued = threading.Thread(target=send, args=("queued", {"prompt": "hi", "max_tokens": 4}))
        queued.start()
        wait_until(lambda: len(line) == 2)
        busy = post(url, {"model": model, "prompt": "x", "max_tokens": 2})
        assert "busy" in error(busy, 429) and int(busy.headers["retry-after"]) >= 1
        long.join(timeout=30)
        queued.join(timeout=30)
    r, took = results["long"]
    assert "past this server's limit of 2 s" in error(r, 504) and took < 8
    r, took = results["queued"]
    assert r.status_code == 200 and took < 8


def test_a_client_that_leaves_frees_the_model(model):
    """A client that gives up (closes the connection) leaves the queue, or has its generation stopped at once."""
    app = create_app(models=[model], limits=ServeLimits(timeout_s=600, max_tokens=60000))
    line = app.state.line

    def give_up_after(seconds: float) -> None:
        with pytest.raises(httpx.ReadTimeout):
            http.post(f"{url}/completions", json={"model": model, **LONG}, timeout=seconds)

    with serving(app) as url:
        assert post(url, {"model": model, "prompt": "x", "max_tokens": 2}).status_code == 200  # loads the model
        generating = threading.Thread(target=give_up_after, args=(3,))
        generating.start()
        wait_until(lambda: len(line) == 1)
        give_up_after(1)  # queued behind it
        wait_until(lambda: len(line) == 1, timeout=1)
        generating.join()
        wait_until(lambda: len(line) == 0, timeout=2)
        t0 = time.monotonic()
        assert post(url, {"model": model, "prompt": "x", "max_tokens": 2}).status_code == 200
        assert time.monotonic() - t0 < 3


def test_help_shows_the_limits_defaults():
    from dataclasses import asdict

    from flywheel.cli import build_parser
    from flywheel.cli.serve import _LIMITS

    assert set(_LIMITS) == set(asdict(ServeLimits()))
    for field, value in asdict(ServeLimits()).items():
        assert _LIMITS[field][2].endswith(f"default {value})"), field
    assert build_parser().parse_args(["serve", "--model", "m"]).max_queue is None  # ServeLimits' default applies


@pytest.mark.slow  # `flywheel serve` in a subprocess
def test_sigterm_stops_a_running_generation_and_exits(model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flywheel = Path(sys.executable).with_name("flywheel")
    proc = subprocess.Popen([str(flywheel), "serve", "--model", model, "--port", str(port), "--device", "cpu",
                             "--api-key-env", "FLYWHEEL_SERVE_TEST_KEY", "--timeout", "600", "--max-tokens", "60000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "FLYWHEEL_SERVE_TEST_KEY": KEY, "HF_HUB_OFFLINE": "1"})
    url, auth, results = f"http://127.0.0.1:{port}/v1", {"Authorization": f"Bearer {KEY}"}, {}
    try:
        wait_until(lambda: proc.poll() is not None or _up(url, auth), timeout=90)
        assert proc.poll() is None, proc.communicate()[0]
        assert post(url, {"model": model, "prompt": "x", "max_tokens": 2}, headers=auth).status_code == 200

        def long() -> None:
            try:
                results["long"] = post(url, {"model": model, **LONG}, headers=auth)
            except httpx.TransportError as e:
                results["long"] = e

        thread = threading.Thread(target=long)
        thread.start()
        time.sleep(1.5)  # generating by now (the model is loaded)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        exited = time.monotonic() - t0
        thread.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        log = proc.communicate()[0]
    assert exited < 10
    r = results["long"]
    assert isinstance(r, httpx.TransportError) or "shutting down" in error(r, 503), r
    assert "Auth: a bearer token from $FLYWHEEL_SERVE_TEST_KEY" in log and KEY not in log


def _up(url: str, headers: dict) -> bool:
    try:
        return http.get(f"{url}/models", headers=headers).status_code == 200
    except httpx.TransportError:
        return False
