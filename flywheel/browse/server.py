"""The web server of `flywheel browse`: the stdlib's ThreadingHTTPServer, bound to exactly the host and port given
(127.0.0.1 by default), over a registry it opens read-only per request.

Every GET opens the registry with `Registry(root, read_only=True)` for that request only, waiting at most
`read_wait_s` while a run writes (then answers 503 "registry busy"), so a page never holds the file for long and never
takes the run lock: a running flywheel goes on. The one write, POST /pair/ID/label, goes through
`queries.add_label`, which refuses at once (409, "registry busy, try again") while a run holds the registry's lock.
A POST whose Origin header names another site is refused (403), so another page in the browser cannot label.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from ..registry import Registry
from ..registry.base import RegistryLockedError, RegistryMissingError
from ..registry.lineage import LineageError, lineage, pair_lineage
from . import pages, queries

log = logging.getLogger("flywheel")
READ_WAIT_S = 5.0
MAX_FORM = 64 * 1024


class Busy(Exception):
    """The registry could not be opened in time: answered 503 (reads) or 409 (a label)."""


class NotFound(Exception):
    pass


def _routes(app: "Browse") -> list:
    return [(re.compile(r"/"), app.runs), (re.compile(r"/run/([^/]+)"), app.run),
            (re.compile(r"/run/([^/]+)/(\d+)"), app.pairs), (re.compile(r"/pair/([^/]+)"), app.pair),
            (re.compile(r"/id/([^/]+)"), app.ident), (re.compile(r"/png/([^/]+)/([\w.-]+\.png)"), app.png)]


class Browse:
    """The pages, each a function of the path's parts and the query string -> (status, content type, body)."""

    def __init__(self, root: Path, read_wait_s: float = READ_WAIT_S):
        self.root, self.read_wait_s = Path(root), read_wait_s
        self.routes = _routes(self)

    @contextmanager
    def reading(self) -> Iterator[Registry]:
        try:
            reg = Registry(self.root, read_only=True, wait_s=self.read_wait_s)
        except RegistryLockedError as e:
            raise Busy(f"registry busy, try again in a moment: {e}") from None
        with reg:
            yield reg

    def runs(self, params: dict) -> str:
        with self.reading() as reg:
            return pages.runs_page(queries.runs(reg))

    def run(self, params: dict, run_id: str) -> str:
        from ..analysis import report

        with self.reading() as reg:
            if not reg.scalar("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]):
                raise NotFound(f"no run {run_id!r} in {reg.path}")
            iterations = report.collect(reg, run_id)
            warnings = report.fired(report.evaluate(iterations, report.monitors_config(reg, run_id)))
        out = self.root / "runs" / run_id
        images = sorted(p.name for p in out.glob("*.png")) if out.is_dir() else []
        return pages.run_page(run_id, iterations, report.main_grid(iterations), warnings, images)

    def pairs(self, params: dict, run_id: str, t: str) -> str:
        pq = queries.PairQuery.parse(params)
        with self.reading() as reg:
            sids = queries.stages_of(reg, run_id, int(t))
            if "pairs" not in sids:
                raise NotFound(f"run {run_id!r} iteration {t} has no pairs stage")
            rows, total = queries.pairs_page(reg, sids, pq)
        return pages.pairs_page(run_id, int(t), rows, total, pq)

    def pair(self, params: dict, pair_id: str, message: str = "", message_class: str = "ok") -> str:
        with self.reading() as reg:
            found = pair_lineage(reg, pair_id)
            if found is None:
                raise NotFound(f"no pair {pair_id!r} in {reg.path}")
            labels = queries.labels(reg, pair_id)
        saved = [x for x in labels if x["label_id"] == params.get("saved")]
        if saved and not message:
            message = f"saved: {saved[0]['label']} by {saved[0]['who']}"
        return pages.pair_page(found, labels, message, message_class)

    def ident(self, params: dict, ident: str) -> str:
        with self.reading() as reg:
            try:
                return pages.lineage_page(ident, lineage(reg, ident))
            except LineageError:
                found = queries.find_row(reg, ident)
                if found is None:
                    raise NotFound(f"{ident!r} names nothing in {reg.path}") from None
                return pages.row_page(ident, found[0], found[1], queries.pairs_using(reg, found[0], ident))

    def png(self, params: dict, run_id: str, name: str) -> bytes:
        path = self.root / "runs" / run_id / name
        if "/" in run_id or run_id in (".", "..") or not path.is_file():
            raise NotFound(f"no plot {name}")
        return path.read_bytes()

    def label(self, pair_id: str, form: dict) -> tuple[int, str]:
        """(303, the pair page's URL) once written, else (409 busy | 400 bad form, the pair page saying why)."""
        try:
            row = queries.add_label(self.root, pair_id, form.get("label", ""), form.get("note", ""),
                                    form.get("who", ""))
        except RegistryLockedError as e:  # the run lock (RegistryBusyError) or the file kept past the wait
            return 409, self._pair_or_error(pair_id, f"registry busy, try again: {e}", "busy", 409)
        except ValueError as e:
            return 400, self._pair_or_error(pair_id, str(e), "err", 400)
        return 303, f"/pair/{quote(pair_id, safe='')}?saved={row['label_id']}"

    def _pair_or_error(self, pair_id: str, message: str, cls: str, status: int) -> str:
        try:
            return self.pair({}, pair_id, message, cls)
        except (Busy, NotFound):
            return pages.error(status, message)


class Handler(BaseHTTPRequestHandler):
    app: Browse  # set on the subclass made by `make_server`
    server_version = "flywheel-browse"

    def log_message(self, fmt: str, *args) -> None:
        log.debug("browse: " + fmt, *args)

    def _send(self, status: int, body: str | bytes, ctype: str = "text/html; charset=utf-8") -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        params = dict(parse_qsl(url.query))
        for pattern, view in self.app.routes:
            m = pattern.fullmatch(url.path)
            if m:
                try:
                    body = view(params, *(unquote(g) for g in m.groups()))
                except Busy as e:
                    return self._send(503, pages.error(503, str(e)))
                except NotFound as e:
                    return self._send(404, pages.error(404, str(e)))
                except RegistryMissingError as e:
                    return self._send(500, pages.error(500, str(e)))
                return self._send(200, body, "image/png" if url.path.endswith(".png") else "text/html; charset=utf-8")
        self._send(404, pages.error(404, f"no page {url.path}"))

    def do_POST(self) -> None:
        m = re.fullmatch(r"/pair/([^/]+)/label", urlsplit(self.path).path)
        if not m:
            return self._send(404, pages.error(404, "not found"))
        origin = self.headers.get("Origin")
        if origin and origin != "null" and urlsplit(origin).netloc != self.headers.get("Host"):
            return self._send(403, pages.error(403, f"a label from another site ({origin}) is refused"))
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_FORM:
            return self._send(413, pages.error(413, "form too large"))
        form = dict(parse_qsl(self.rfile.read(length).decode("utf-8", "replace")))
        status, body = self.app.label(unquote(m.group(1)), form)
        if status == 303:  # POST, redirect, GET: reloading the page does not label twice
            self.send_response(303)
            self.send_header("Location", body)
            self.send_header("Content-Length", "0")
            return self.end_headers()
        self._send(status, body)


def check_host(host: str) -> str:
    """The host to bind: an IP address or 'localhost'; refuses an empty host (every interface, unasked for)."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"--host must be an IP address (127.0.0.1 by default), not {host!r}") from None
    return host


def make_server(root: Path, host: str = "127.0.0.1", port: int = 8050,
                read_wait_s: float = READ_WAIT_S) -> ThreadingHTTPServer:
    """A server bound to exactly (host, port) (port 0: a free one); `serve_forever()` runs it. Raises
    RegistryMissingError when `root` holds no registry, so a typo fails at start, not on the first page."""
    if not (Path(root) / "flywheel.duckdb").is_file():
        raise RegistryMissingError(f"no registry at {root} (no flywheel.duckdb there); pass --registry DIR")
    host = check_host(host)
    handler = type("BrowseHandler", (Handler,), {"app": Browse(Path(root), read_wait_s)})
    server_cls = type("BrowseServer", (ThreadingHTTPServer,), {
        "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET,
        "daemon_threads": True})
    return server_cls((host, port), handler)


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    """Run a server in a daemon thread (tests, the bench); `server.shutdown()` stops it."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread
