"""`flywheel serve` under abuse: normal clients' latency with abusive clients hammering the same server, against the
same normal clients alone (the baseline), and the server's peak RSS in each phase.

    python bench/serve_load.py           # ~1.5 min here: a random tiny model, 4 normal + 8 abusive clients, 25 s each
    python bench/serve_load.py --smoke   # ~1 min here, most of it the server's start-up (4 s phases)

The server is the real command, `flywheel serve --api-key-env ... --device cpu`, in a subprocess on 127.0.0.1 with
its default limits. Normal clients (threads, one httpx client each) send chat requests back to back (n=2, 16 tokens,
the key). Abusive clients cycle through what a red-team sent: a 2 MB body, a 1 MB prompt, max_tokens 10**9, 2000
prompts x n=128, no key and a wrong key. Bodies are encoded once, so the client process spends little CPU per request.
Peak RSS is the server's VmHWM, reset at each phase's start through /proc/PID/clear_refs (else sampled every 20 ms).
It shows that every abusive request is refused (4xx, none reaching the model), that the server's memory stays near
the baseline's, and what the refusals still cost the normal clients: each takes 1-15 ms of the server's CPU (and of
the GIL its generation thread needs). It exits non-zero if a phase had no normal success or any answer was a 5xx.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from _common import REPO, print_table, ratio, tiny_model

KEY_ENV = "FLYWHEEL_BENCH_SERVE_KEY"
KEY = "sk-bench-" + os.urandom(8).hex()
NORMAL = "Write two short sentences about the sea."


class Server:
    """`flywheel serve` in a subprocess, and its peak RSS since `reset()`."""

    def __init__(self, model: Path, threads: int, log):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        env = {**os.environ, KEY_ENV: KEY, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        flywheel = Path(sys.executable).with_name("flywheel")
        self.log = log
        self.proc = subprocess.Popen([str(flywheel), "serve", "--model", str(model), "--port", str(port), "--device",
                                      "cpu", "--api-key-env", KEY_ENV], cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.status = Path(f"/proc/{self.proc.pid}/status")
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
            self.method = "VmHWM"
        except OSError:
            self.method = "sampled"
            self._peak = 0.0
            threading.Thread(target=self._sample, daemon=True).start()

    def wait_up(self, client, timeout: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.get(f"{self.url}/models", headers=auth()).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                sys.exit(f"flywheel serve did not come up:\n{self.log.read()[-3000:]}")
            time.sleep(0.3)

    def _rss_mb(self) -> float:
        try:
            return int(re.search(r"VmRSS:\s+(\d+) kB", self.status.read_text()).group(1)) / 1024
        except (OSError, AttributeError):
            return 0.0

    def _sample(self) -> None:
        while self.proc.poll() is None:
            self._peak = max(self._peak, self._rss_mb())
            time.sleep(0.02)

    def reset(self) -> None:
        if self.method == "VmHWM":
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        else:
            self._peak = self._rss_mb()

    def peak_mb(self) -> float:
        if self.method == "VmHWM":
            return int(re.search(r"VmHWM:\s+(\d+) kB", self.status.read_text()).group(1)) / 1024
        return max(self._peak, self._rss_mb())

    def cpu_s(self) -> float:
        """The server's CPU seconds so far (user + system, all threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> float:
        """SIGTERM; the seconds until the process has gone."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return time.monotonic() - t0


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def abuses(model: str) -> list[tuple[str, str, bytes, dict]]:
    """(kind, endpoint, body, headers) of each abusive request, encoded once."""

    def body(**fields) -> bytes:
        return json.dumps({"model": model, **fields}).encode()

    chat = [{"role": "user", "content": NORMAL}]
    return [
        ("2 MB body", "completions", body(prompt="x" * 2_000_000), auth()),
        ("1 MB prompt", "completions", body(prompt="word " * 200_000), auth()),
        ("max_tokens 10**9", "chat/completions", body(messages=chat, max_tokens=10**9), auth()),
        ("2000 prompts x n=128", "completions", body(prompt=["hi"] * 2000, n=128, max_tokens=16), auth()),
        ("no key", "chat/completions", body(messages=chat, max_tokens=16), {"Content-Type": "application/json"}),
        ("wrong key", "chat/completions", body(messages=chat, max_tokens=16), auth("sk-wrong")),
    ]


def run_phase(url: str, model: str, clients: int, abusers: int, seconds: float) -> tuple[list[float], Counter, Counter]:
    """Normal latencies (s, successful requests), normal statuses, abusive statuses ("kind status")."""
    import httpx

    normal = json.dumps({"model": model, "messages": [{"role": "user", "content": NORMAL}], "n": 2,
                         "max_tokens": 16, "temperature": 1.0}).encode()
    bad = abuses(model)
    latencies, statuses, abused, lock = [], Counter(), Counter(), threading.Lock()
    end = time.monotonic() + seconds

    def normal_client() -> None:
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < end:
                t0 = time.monotonic()
                try:
                    status = client.post(f"{url}/chat/completions", content=normal, headers=auth()).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                took = time.monotonic() - t0
                with lock:
                    statuses[status] += 1
                    if status == 200:
                        latencies.append(took)

    def abusive_client(offset: int) -> None:
        i = offset
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < end:
                kind, endpoint, content, headers = bad[i % len(bad)]
                i += 1
                try:
                    status = client.post(f"{url}/{endpoint}", content=content, headers=headers).status_code
                except httpx.HTTPError as e:  # a server may close the connection on a body it will not read
                    status = type(e).__name__
                with lock:
                    abused[f"{kind}: {status}"] += 1

    threads = [threading.Thread(target=normal_client) for _ in range(clients)]
    threads += [threading.Thread(target=abusive_client, args=(i,)) for i in range(abusers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, statuses, abused


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a smaller model and 4 s phases")
    p.add_argument("--model", default=None, help="a model folder (default: a random tiny model)")
    p.add_argument("--clients", type=int, default=4, help="normal clients (default 4)")
    p.add_argument("--abusers", type=int, default=8, help="abusive clients in the second phase (default 8)")
    p.add_argument("--seconds", type=float, default=None, help="length of each phase (default 25; smoke: 4)")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads (OMP_NUM_THREADS, default 1)")
    args = p.parse_args()
    seconds = args.seconds or (4 if args.smoke else 25)

    import httpx

    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile("w+") as log:
        model = Path(args.model) if args.model else tiny_model(Path(tmp) / "model", smoke=args.smoke)
        server = Server(model, args.threads, log)
        try:
            with httpx.Client(timeout=120) as client:
                t0 = time.monotonic()
                server.wait_up(client)
                startup = time.monotonic() - t0
                body = {"model": str(model), "messages": [{"role": "user", "content": NORMAL}], "max_tokens": 4}
                client.post(f"{server.url}/chat/completions", json=body, headers=auth()).raise_for_status()  # loads
            phases = {}
            for name, abusers in (("baseline: normal clients alone", 0), ("under abuse", args.abusers)):
                server.reset()
                cpu0 = server.cpu_s()
                latencies, statuses, abused = run_phase(server.url, str(model), args.clients, abusers, seconds)
                phases[name] = (latencies, statuses, abused, server.peak_mb(), server.cpu_s() - cpu0)
        finally:
            stop_s = server.stop()

    base_lat = phases["baseline: normal clients alone"][0]
    rows = []
    for name, (latencies, statuses, abused, peak, cpu) in phases.items():
        sent = sum(statuses.values()) + sum(abused.values())
        rows.append([name, sent, " ".join(f"{k}x{v}" for k, v in sorted(statuses.items(), key=str)),
                     f"{percentile(latencies, 0.5) * 1000:.0f}", f"{percentile(latencies, 0.99) * 1000:.0f}",
                     ratio(percentile(latencies, 0.99), percentile(base_lat, 0.99)), f"{peak:.0f}", f"{cpu:.1f}"])
    abused = phases["under abuse"][2]
    size = "smoke" if args.smoke else "configs/tiny.yaml"
    notes = [f"abusive requests ({sum(abused.values())}): " + "; ".join(f"{k} x{v}" for k, v in sorted(abused.items())),
             (f"{args.clients} normal clients (chat, n=2, max_tokens 16) and {args.abusers} abusive ones, {seconds:g} "
              f"s a phase; server: flywheel serve, default limits, OMP_NUM_THREADS={args.threads}; model: "
              f"{args.model or f'random tiny ({size} size)'}"),
             f"server start-up {startup:.1f} s; SIGTERM to exit {stop_s:.1f} s; peak RSS by {server.method}"]
    print_table("flywheel serve under abuse", ["phase", "requests sent", "normal statuses", "normal p50 ms",
                                               "normal p99 ms", "p99 vs baseline", "server peak RSS MB",
                                               "server CPU s"], rows, notes)
    normal_ok = [phases[n][1].get(200, 0) for n in phases]
    server_errors = sum(v for ph in phases.values() for k, v in (*ph[1].items(), *ph[2].items())
                        if str(k).split(": ")[-1].startswith("5"))
    if min(normal_ok) == 0 or server_errors:
        sys.exit(f"could not measure: normal successes per phase {normal_ok}, 5xx answers {server_errors}")


if __name__ == "__main__":
    main()
