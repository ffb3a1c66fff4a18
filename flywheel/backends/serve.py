"""A small OpenAI-compatible HTTP server for local models, generating through the transformers backend, fit to expose.

    flywheel serve --models-dir data_registry/models --port 8000 [--api-key-env FLYWHEEL_SERVE_KEY]
    flywheel run -c configs/demo.yaml generate.backend=openai generate.openai.base_url=http://127.0.0.1:8000/v1

    app = create_app(models=["path/to/model"], limits=ServeLimits(timeout_s=30), api_key=None)   # a FastAPI app
    with serving(app) as base_url:                             # uvicorn on a free port, in a thread
        httpx.post(f"{base_url}/completions", json={"model": "path/to/model", "prompt": "Hi", "n": 2})

Endpoints: GET /v1/models, POST /v1/completions and POST /v1/chat/completions (not streaming; `n`, `temperature`,
`top_p`, `max_tokens`, `seed`, `stop`). A model's name is its path, as given with `--model` or as any folder with a
`config.json` under `--models-dir` (a path inside it, or relative to it), which is the path the registry records, so
the flywheel's openai backend reaches every iteration's model with no extra setting. Models load on first use, one at
a time. Responses are OpenAI-shaped; each choice also carries its own `usage.completion_tokens` (an extension the
openai backend reads for exact per-candidate token counts).

Guards, in the order a request meets them (each limit a `ServeLimits` field and a `flywheel serve` flag):
- with `api_key`, every endpoint wants `Authorization: Bearer <key>` (401 otherwise); only the key's SHA-256 is kept;
- the body: at most `max_body_bytes`, checked from Content-Length and again while reading, before any parsing (413);
- the request: 400 naming the field for a bad value (seed outside 0..2**63-1, no or empty prompt, greedy with n > 1,
  `max_tokens` over `max_tokens`, n x prompts over `max_choices`, a prompt over `max_prompt_tokens` or the model's
  context, counted with the model's tokenizer before the request queues); 404 for an unknown model;
- the model: one generation at a time, first come first served, at most `max_queue` requests waiting (429 with
  Retry-After beyond that);
- time: a generation running `timeout_s` is stopped (between two tokens) and its request gets 504 (no partial texts:
  a cut answer would pass for a short one), so a request waits at most (max_queue + 1) x timeout_s. A client that
  closes its connection leaves the queue, or has its generation stopped. `max_tokens` past what the context leaves
  after the prompt is cut to fit (finish "length").
SIGTERM (`flywheel serve`) or leaving `serving` stops the running generation and turns queued requests away (503).
Errors are OpenAI-shaped ({"error": {"message", "type", "param", "code"}}) and never show a server path or the key:
500 says only that generation failed (the traceback goes to the server's log).

The same seed gives the same texts.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import math
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from .generation import Generation, SamplingParams, TransformersBackend

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask of the server; the defaults fit a small model on a CPU."""

    max_body_bytes: int = 1 << 20  # 413 beyond
    max_prompt_tokens: int = 2048  # per prompt, and never past the model's context (400)
    max_tokens: int = 1024  # max_tokens / max_completion_tokens (400)
    max_choices: int = 64  # n x prompts in one request (400)
    max_queue: int = 8  # requests waiting for the model while one generates (429 beyond)
    timeout_s: float = 60.0  # the longest generation (504), half the openai backend's 120 s client timeout

    def __post_init__(self):
        for name, value in asdict(self).items():
            may_be_zero = name == "max_queue"
            if value < 0 or (value == 0 and not may_be_zero):
                raise ValueError(f"the serve limit {name} must be {'>= 0' if may_be_zero else '> 0'}, got {value}")


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, logprobs: null, ...)

    model: str
    n: int = Field(1, ge=1, le=128)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: Literal[False] = Field(False, description="Streaming is not supported.")


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ServeError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def _bad(param: str, message: str) -> ServeError:
    return ServeError(400, f"{param}: {message}", param=param)


def _is_model(path: Path) -> bool:
    return (path / "config.json").is_file()


@dataclass(frozen=True)
class Counting:
    """A model's prompt measure: a tokenizer of its own, so counting never waits for the model, and is safe from
    several threads at once (it never changes the tokenizer's padding or truncation, and releases the GIL); the
    context length (None if the config gives none); and the most text bytes one token stands for, so that a text of
    more than `limit x token_bytes` bytes is known to exceed `limit` tokens without tokenizing it (a 1 MB prompt takes
    seconds to tokenize)."""

    tokenizer: object
    context: int | None
    token_bytes: int

    @classmethod
    def load(cls, path: Path) -> Counting:
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(path)
        context = next((v for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                        if isinstance(v := getattr(config, k, None), int)), None)
        tok = AutoTokenizer.from_pretrained(path)
        tok.encode("x", add_special_tokens=False)  # settles the tokenizer's settings before threads share it
        # A token's string in UTF-8 is at least the bytes it covers (byte-level BPE spells one byte in up to two);
        # x4 where a normalizer (NFKC: 4-byte letters to 1-byte ones) may shrink the text before it is split.
        backend = getattr(tok, "backend_tokenizer", None)
        shrink = 1 if backend is not None and backend.normalizer is None else 4
        return cls(tok, context, shrink * max(len(t.encode()) for t in tok.get_vocab()))

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))


class ModelStore:
    """Model names -> folders, the one loaded model, and the `Counting` of the last model asked for."""

    def __init__(self, models: list[str | Path] = (), models_dir: str | Path | None = None, device: str = "cpu"):
        self.fixed = {str(m): Path(m) for m in models}
        for name, path in self.fixed.items():
            if not _is_model(path):
                raise ValueError(f"--model {name}: not a model folder (no config.json in it)")
        self.dir_arg = Path(models_dir) if models_dir is not None else None
        self.dir = self.dir_arg.resolve() if self.dir_arg is not None else None
        if self.dir is not None and not self.dir.is_dir():
            raise ValueError(f"--models-dir {models_dir}: not a folder")
        self.device = device
        self._loaded: tuple[Path, TransformersBackend] | None = None
        self._count_lock = threading.Lock()
        self._counting: tuple[Path, Counting] | None = None

    @property
    def loaded(self) -> Path | None:
        """The folder of the model in memory, if any."""
        return self._loaded[0] if self._loaded else None

    def names(self) -> list[str]:
        names = list(self.fixed)
        if self.dir is not None:
            names += sorted(str(self.dir_arg / c.parent.relative_to(self.dir)) for c in self.dir.rglob("config.json"))
        return list(dict.fromkeys(names))

    def resolve(self, name: str) -> Path:
        """The model folder `name` stands for; 404 (naming no path of the server's) if none."""
        try:
            path = self._find(name)
        except (OSError, ValueError):  # a name no file system takes (too long, a NUL in it)
            path = None
        if path is None:
            raise ServeError(404, f"The model {name[:200]!r} does not exist on this server; GET /v1/models lists the "
                                  "served models", param="model", code="model_not_found")
        return path.resolve()

    def _find(self, name: str) -> Path | None:
        if name in self.fixed:
            return self.fixed[name]
        wanted = Path(name)
        for path in self.fixed.values():
            if wanted.resolve() == path.resolve():  # the same folder, spelled another way
                return path
        if self.dir is not None and name:
            for candidate in (wanted, self.dir / wanted, self.dir / wanted.name):
                c = candidate.resolve()
                if (c == self.dir or self.dir in c.parents) and _is_model(c):
                    return c
        return None

    def counting(self, path: Path) -> Counting:
        """The `Counting` of the resolved folder `path` (the last one asked for is kept)."""
        with self._count_lock:
            if self._counting is None or self._counting[0] != path:
                self._counting = None
                self._counting = (path, Counting.load(path))
            return self._counting[1]

    def backend(self, path: Path) -> TransformersBackend:
        """The loaded backend for the resolved folder `path` (call during a turn of the app's `Line`); loads it,
        dropping the previous one, if needed."""
        if self._loaded is None or self._loaded[0] != path:
            self._loaded = None
            gc.collect()
            self._loaded = (path, TransformersBackend(str(path), self.device))
        return self._loaded[1]


class Line:
    """Turns at the model, first come first served: one request generates, at most `max_queue` wait, the rest are
    refused (429, Retry-After from the recent turns' length). A request whose client has gone leaves the line.
    `close()` stops the generation running (`closed` is set: its stop check sees it) and turns away every waiting
    and later request (503)."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.closed = threading.Event()
        self._cond = threading.Condition()
        self._line: deque[object] = deque()  # the head holds the model
        self._turn_s = 1.0  # a running estimate of one turn's length

    def __len__(self) -> int:
        return len(self._line)

    def close(self) -> None:
        with self._cond:
            self.closed.set()
            self._cond.notify_all()

    @contextmanager
    def turn(self, gone: threading.Event) -> Iterator[None]:
        """Wait for the model, hold it for the block, then pass it on; leave the line if `gone` (the client) is set."""
        me = object()
        with self._cond:
            if self.closed.is_set():
                raise _shutting_down()
            if len(self._line) > self.max_queue:
                wait = max(1, min(600, math.ceil(self._turn_s * len(self._line))))
                raise ServeError(429, f"The server is busy: {len(self._line) - 1} request(s) wait for the model; "
                                      f"retry in {wait} s", type_="rate_limit_error",
                                 code="rate_limit_exceeded", headers={"Retry-After": str(wait)})
            self._line.append(me)
            try:
                while self._line[0] is not me:
                    if self.closed.is_set():
                        raise _shutting_down()
                    if gone.is_set():
                        raise _client_gone()
                    self._cond.wait(0.25)
            except BaseException:
                self._line.remove(me)
                self._cond.notify_all()
                raise
        start = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self._line.popleft()
                self._turn_s = 0.7 * self._turn_s + 0.3 * (time.monotonic() - start)
                self._cond.notify_all()


def _shutting_down() -> ServeError:
    return ServeError(503, "The server is shutting down", type_="server_error", code="shutting_down")


def _client_gone() -> ServeError:  # nobody reads it: the client has closed the connection
    return ServeError(499, "The client closed the connection", code="client_closed_request")


class _Guard:
    """ASGI middleware before every route: the bearer token (401), then the body, read here in full and at most
    `max_body` bytes of it (413), so no route ever parses more. Then, while the route runs, it watches for the client
    leaving and sets `request.state.gone` (a threading.Event) when it does, to stop the request's generation."""

    def __init__(self, app, max_body: int, key_sha256: bytes | None):
        self.app, self.max_body, self.key_sha256 = app, max_body, key_sha256

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key_sha256 is not None:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(hashlib.sha256(token.strip()).digest(),
                                                                          self.key_sha256):
                error = ServeError(401, "Missing or incorrect API key: send the header Authorization: Bearer <key>",
                                   code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await error.response()(scope, receive, send)
        too_large = ServeError(413, f"The request body is larger than this server's limit of {self.max_body} bytes",
                               headers={"Connection": "close"})
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await too_large.response()(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                return await too_large.response()(scope, receive, send)
            if not message.get("more_body"):
                break
        gone, left = threading.Event(), asyncio.Event()
        scope.setdefault("state", {})["gone"] = gone
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                await left.wait()
                return {"type": "http.disconnect"}
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            left.set()

        watcher = asyncio.ensure_future(watch())  # uvicorn runs asyncio
        try:
            await self.app(scope, replay, send)
        finally:
            watcher.cancel()


def create_app(models: list[str | Path] = (), models_dir: str | Path | None = None, device: str = "cpu",
               limits: ServeLimits = ServeLimits(), api_key: str | None = None) -> FastAPI:
    """The server's FastAPI app. `models`: model folders served under their path as given; `models_dir`: every model
    folder under it, loaded on demand; `api_key`: the bearer token every request must carry (None: no auth). Raises
    ValueError for a path that is not a model folder or an empty key."""
    if api_key is not None and not api_key:
        raise ValueError("the API key is empty")
    store = ModelStore(models, models_dir, device)
    line = Line(limits.max_queue)
    app = FastAPI(title="flywheel serve", description="OpenAI-compatible completions for local models.")
    app.state.store, app.state.line, app.state.limits = store, line, limits
    app.add_middleware(_Guard, max_body=limits.max_body_bytes,
                       key_sha256=hashlib.sha256(api_key.encode()).digest() if api_key else None)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, e: ServeError):
        return e.response()

    @app.exception_handler(HTTPException)  # unknown routes, wrong methods
    async def _http_error(request: Request, e: HTTPException):
        return ServeError(e.status_code, str(e.detail), headers=e.headers).response()

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, e: RequestValidationError):
        problems = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
            problems.append(f"{field}: {err['msg']}")
        first = [p for p in next(iter(e.errors()), {"loc": ()})["loc"] if p != "body"]
        param = str(first[0]) if first else None  # the request's field ("stop", not "stop.list[str]")
        return ServeError(400, "; ".join(problems), param=param).response()

    @app.exception_handler(Exception)  # uvicorn logs the traceback; the client learns nothing of the server's files
    async def _failed(request: Request, e: Exception):
        return ServeError(500, "Generation failed on the server (its log has the details)", type_="server_error"
                          ).response()

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list",
                "data": [{"id": n, "object": "model", "created": 0, "owned_by": "flywheel"} for n in store.names()]}

    def run(request: Request, req: _Sampling, field: str, prompts: int, render: Callable[[object], list[str]],
            max_tokens: int | None, tokens_field: str, default_max: int) -> tuple[list[Generation], int]:
        """All choices (prompt by prompt, n each) and the prompt token count, after every check."""
        path = store.resolve(req.model)
        if max_tokens is not None and max_tokens > limits.max_tokens:
            raise _bad(tokens_field, f"{max_tokens} is over this server's limit of {limits.max_tokens}")
        if req.n > 1 and req.temperature == 0:
            raise _bad("n", "greedy decoding (temperature 0) gives one answer per prompt; ask for n=1, or sample")
        if req.n * prompts > limits.max_choices:
            raise _bad("n", f"n x prompts = {req.n} x {prompts} = {req.n * prompts} choices; this server gives at "
                            f"most {limits.max_choices} per request")
        counting = store.counting(path)
        texts, context = render(counting.tokenizer), counting.context
        longest = limits.max_prompt_tokens if context is None else min(limits.max_prompt_tokens, context - 1)
        lengths = []
        for i, text in enumerate(texts):
            which = f"the prompt at index {i}" if prompts > 1 else "the prompt"
            n = counting.count(text) if len(text.encode()) <= longest * counting.token_bytes else None
            if n == 0:
                raise _bad(field, f"{which} is empty")
            if n is None or n > longest:
                raise _bad(field, f"{which} has {'more than ' + str(longest) if n is None else n} tokens; this server "
                                  f"takes at most {longest} per prompt"
                                  + (f" (the model's context is {context})" if context is not None else ""))
            lengths.append(n)
        new_tokens = max_tokens or min(default_max, limits.max_tokens)
        if context is not None:
            new_tokens = min(new_tokens, context - max(lengths))
        params = SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p, max_new_tokens=new_tokens)
        seed = req.seed if req.seed is not None else secrets.randbits(31)
        stops = [req.stop] if isinstance(req.stop, str) else [s for s in req.stop or [] if s]
        gone = request.state.gone
        with line.turn(gone):
            backend = store.backend(path)  # a load is not stopped, nor counted in the generation's time
            deadline = time.monotonic() + limits.timeout_s
            outs = backend.generate(texts, params, seed=seed, chat=False,
                                    stop=lambda: line.closed.is_set() or gone.is_set() or time.monotonic() > deadline)
            if line.closed.is_set():
                raise _shutting_down()
            if gone.is_set():
                raise _client_gone()
            if time.monotonic() > deadline:
                raise ServeError(504, f"The generation ran past this server's limit of {limits.timeout_s:g} s per "
                                      "request and was stopped; ask for fewer tokens or choices", type_="server_error",
                                 code="timeout")
            gens = [_apply_stop(g, stops, backend.tokenizer) for gens in outs for g in gens]
        return gens, sum(lengths)

    @app.post("/v1/completions")
    def completions(req: CompletionRequest, request: Request) -> dict:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise _bad("prompt", "no prompt given (an empty list)")
        gens, prompt_tokens = run(request, req, "prompt", len(prompts), lambda tok: prompts, req.max_tokens,
                                  "max_tokens", 16)
        choices = [{"index": i, "text": g.text, "logprobs": None, "finish_reason": g.finish_reason,
                    "usage": {"completion_tokens": g.num_tokens}} for i, g in enumerate(gens)]
        return _response("cmpl", "text_completion", req.model, choices, prompt_tokens)

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest, request: Request) -> dict:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]

        def render(tok) -> list[str]:
            try:
                return [tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)]
            except (TemplateError, ValueError, TypeError) as e:  # the template's own checks (roles out of order...)
                raise _bad("messages", f"the model's chat template refuses them ({type(e).__name__}: {e})") from None

        tokens_field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        gens, prompt_tokens = run(request, req, "messages", 1, render, req.max_completion_tokens or req.max_tokens,
                                  tokens_field, 256)
        choices = [{"index": i, "message": {"role": "assistant", "content": g.text}, "logprobs": None,
                    "finish_reason": g.finish_reason, "usage": {"completion_tokens": g.num_tokens}}
                   for i, g in enumerate(gens)]
        return _response("chatcmpl", "chat.completion", req.model, choices, prompt_tokens)

    return app


def _apply_stop(g: Generation, stops: list[str], tok) -> Generation:
    """Cut the text before the first stop string (applied after generation; the count is the cut text re-tokenized)."""
    cuts = [i for i in (g.text.find(s) for s in stops) if i >= 0]
    if not cuts:
        return g
    text = g.text[: min(cuts)].rstrip()
    return Generation(text, len(tok.encode(text, add_special_tokens=False)), "stop")


def _response(prefix: str, obj: str, model: str, choices: list[dict], prompt_tokens: int) -> dict:
    completion_tokens = sum(c["usage"]["completion_tokens"] for c in choices)
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()), "model": model,
            "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                          "total_tokens": prompt_tokens + completion_tokens}}


@contextmanager
def serving(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Run `app` with uvicorn in a background thread (port 0: a free one) and yield its base URL, `http://.../v1`.
    On leaving, a `create_app` app's running generation is stopped and its queue turned away (see `Line.close`)."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="flywheel-serve")
    url = f"http://{host}:{sock.getsockname()[1]}/v1"
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server for {url} did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        if isinstance(getattr(app.state, "line", None), Line):
            app.state.line.close()
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
