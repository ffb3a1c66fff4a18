"""A small OpenAI-compatible HTTP server for local models, generating through the transformers backend.

    flywheel serve --models-dir data_registry/models --port 8000
    flywheel run -c configs/demo.yaml generate.backend=openai generate.openai.base_url=http://127.0.0.1:8000/v1

    app = create_app(models=["path/to/model"], models_dir=None)   # a FastAPI app
    with serving(app) as base_url:                                 # uvicorn on a free port, in a thread
        httpx.post(f"{base_url}/completions", json={"model": "path/to/model", "prompt": "Hi", "n": 2})

Endpoints: GET /v1/models, POST /v1/completions and POST /v1/chat/completions (not streaming; `n`, `temperature`,
`top_p`, `max_tokens`, `seed`, `stop`). A model's name is its path, as given with `--model` or as any folder with a
`config.json` under `--models-dir` (a path inside it, or relative to it), which is the path the registry records, so
the flywheel's openai backend reaches every iteration's model with no extra setting. Models load on first use, one at
a time. Responses are OpenAI-shaped; each choice also carries its own `usage.completion_tokens` (an extension the
openai backend reads for exact per-candidate token counts). Errors are OpenAI-shaped too: 404 for an unknown model,
400 for a bad request (naming the field), 500 when generation itself fails.

Requests are served one at a time (one model, one generate call at a time); the same seed gives the same texts.
"""

from __future__ import annotations

import gc
import secrets
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .generation import Generation, SamplingParams, TransformersBackend


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, logprobs: null, ...)

    model: str
    n: int = Field(1, ge=1, le=128)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
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
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _is_model(path: Path) -> bool:
    return (path / "config.json").is_file()


class ModelStore:
    """Model names -> folders, and the one loaded model."""

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
        self.lock = threading.Lock()
        self._loaded: tuple[Path, TransformersBackend] | None = None

    @property
    def loaded(self) -> Path | None:
        """The folder of the model in memory, if any."""
        return self._loaded[0] if self._loaded else None

    def names(self) -> list[str]:
        names = list(self.fixed)
        if self.dir is not None:
            names += sorted(str(self.dir_arg / c.parent.relative_to(self.dir)) for c in self.dir.rglob("config.json"))
        return list(dict.fromkeys(names))

    def resolve(self, name: str) -> Path | None:
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

    def backend(self, name: str) -> TransformersBackend:
        """The loaded backend for `name` (call with `lock` held); loads it, dropping the previous one, if needed."""
        path = self.resolve(name)
        if path is None:
            raise ServeError(404, f"The model {name!r} does not exist on this server; it serves {self.names()}",
                             param="model", code="model_not_found")
        if self._loaded is None or self._loaded[0] != path.resolve():
            self._loaded = None
            gc.collect()
            self._loaded = (path.resolve(), TransformersBackend(str(path), self.device))
        return self._loaded[1]


def create_app(models: list[str | Path] = (), models_dir: str | Path | None = None, device: str = "cpu") -> FastAPI:
    """The server's FastAPI app. `models`: model folders served under their path as given; `models_dir`: every model
    folder under it, loaded on demand. Raises ValueError for a path that is not a model folder."""
    store = ModelStore(models, models_dir, device)
    app = FastAPI(title="flywheel serve", description="OpenAI-compatible completions for local models.")
    app.state.store = store

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, e: ServeError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, e: RequestValidationError):
        problems = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
            problems.append(f"{field}: {err['msg']}")
        first = next(iter(e.errors()), {"loc": ()})
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return JSONResponse(ServeError(400, "; ".join(problems), param=param).body, status_code=400)

    @app.exception_handler(Exception)
    async def _failed(request: Request, e: Exception):
        return JSONResponse(ServeError(500, f"{type(e).__name__}: {e}", type_="server_error").body, status_code=500)

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list",
                "data": [{"id": n, "object": "model", "created": 0, "owned_by": "flywheel"} for n in store.names()]}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest) -> dict:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        gens, prompt_tokens = _generate(store, req, req.max_tokens or 16, lambda tok: prompts)
        choices = [{"index": i, "text": g.text, "logprobs": None, "finish_reason": g.finish_reason,
                    "usage": {"completion_tokens": g.num_tokens}} for i, g in enumerate(gens)]
        return _response("cmpl", "text_completion", req.model, choices, prompt_tokens)

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest) -> dict:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        max_tokens = req.max_completion_tokens or req.max_tokens or 256

        def texts(tok) -> list[str]:
            return [tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)]

        gens, prompt_tokens = _generate(store, req, max_tokens, texts)
        choices = [{"index": i, "message": {"role": "assistant", "content": g.text}, "logprobs": None,
                    "finish_reason": g.finish_reason, "usage": {"completion_tokens": g.num_tokens}}
                   for i, g in enumerate(gens)]
        return _response("chatcmpl", "chat.completion", req.model, choices, prompt_tokens)

    return app


def _generate(store: ModelStore, req: _Sampling, max_tokens: int,
              texts_for: Callable[[object], list[str]]) -> tuple[list[Generation], int]:
    """All choices (prompt by prompt, n each) and the prompt token count, under the store's lock."""
    params = SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p, max_new_tokens=max_tokens)
    seed = req.seed if req.seed is not None else secrets.randbits(31)
    stops = [req.stop] if isinstance(req.stop, str) else [s for s in req.stop or [] if s]
    with store.lock:
        backend = store.backend(req.model)
        tok = backend.tokenizer
        texts = texts_for(tok)
        outs = backend.generate(texts, params, seed=seed, chat=False)
        prompt_tokens = sum(len(tok.encode(t, add_special_tokens=False)) for t in texts)
        gens = [_apply_stop(g, stops, tok) for gens in outs for g in gens]
    return gens, prompt_tokens


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
    """Run `app` with uvicorn in a background thread (port 0: a free one) and yield its base URL, `http://.../v1`."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
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
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

