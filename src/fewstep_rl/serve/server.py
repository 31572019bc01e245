"""``fewstep-rl reward-server``: serve any installed rewards over HTTP with the JSON protocol of
:mod:`fewstep_rl.serve.protocol`, so reward models with conflicting dependencies can run in their own environment.

Concurrency: HTTP handlers run one thread per connection; they only decode and validate, then hand the request to
one scoring thread, which **batches** queued requests of the same image size (up to ``max_batch`` images) into one
reward call and splits the scores back. Each handler waits at most ``request_timeout`` seconds for its scores
(504 after that). Bodies above ``max_bytes`` are refused from the ``Content-Length`` header before they are read
(413); bodies without a length are refused (411). Non-finite scores go out as ``null`` (the client refuses them).
"""

from __future__ import annotations

import json
import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from fewstep_rl.serve.protocol import VERSION, ProtocolError, ScoreRequest, decode_request, encode_scores


class RewardServer:
    """An HTTP reward server around a ``MultiReward`` (start/stop it, or use it as a context manager)."""

    def __init__(self, rewards: Any, host: str = "127.0.0.1", port: int = 0, max_batch: int = 32,
                 request_timeout: float = 120.0, max_bytes: int = 64 << 20, max_pixels: int = 64 * 1024 * 1024,
                 batch_wait: float = 0.005, device: str = "cpu") -> None:
        self.rewards = rewards
        self.max_batch, self.request_timeout, self.batch_wait = int(max_batch), float(request_timeout), batch_wait
        self.max_bytes, self.max_pixels, self.device = int(max_bytes), int(max_pixels), device
        self.queue: queue.Queue[tuple[ScoreRequest, Future]] = queue.Queue()
        self.stopping = threading.Event()
        self.batches: list[int] = []  # images per reward call (for tests and logs)
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> RewardServer:
        for target in (self.httpd.serve_forever, self._score_loop):
            t = threading.Thread(target=target, daemon=True, name=f"reward-server-{target.__name__}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        for t in self._threads:
            t.join(timeout=5)
        while not self.queue.empty():  # nobody will score these any more
            _, fut = self.queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError("reward server is shutting down"))

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ scoring thread
    def _score_loop(self) -> None:
        pending: list[tuple[ScoreRequest, Future]] = []
        while not self.stopping.is_set():
            if not pending:
                try:
                    pending.append(self.queue.get(timeout=0.05))
                except queue.Empty:
                    continue
            deadline = time.monotonic() + self.batch_wait
            while True:  # gather what is queued now (and what arrives within batch_wait)
                try:
                    pending.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            shape = pending[0][0].images.shape[1:]
            batch, rest, n = [], [], 0
            for item in pending:
                fits = item[0].images.shape[1:] == shape and (not batch or n + len(item[0].images) <= self.max_batch)
                (batch if fits else rest).append(item)
                n += len(item[0].images) if fits else 0
            pending = rest
            self._score_batch(batch)

    def _score_batch(self, batch: list[tuple[ScoreRequest, Future]]) -> None:
        import torch

        live = [(r, f) for r, f in batch if f.set_running_or_notify_cancel()]
        if not live:
            return
        images = torch.from_numpy(np.concatenate([r.images for r, _ in live])).to(self.device)
        prompts = [p for r, _ in live for p in r.prompts]
        meta = [m for r, _ in live for m in r.meta]
        self.batches.append(len(prompts))
        try:
            with torch.no_grad():
                scores = self.rewards(images, prompts, meta)
                combined = self.rewards.combine(scores)
            scores = {k: v.detach().float().cpu().tolist() for k, v in scores.items()}
            combined = combined.detach().float().cpu().tolist()
        except Exception as e:  # noqa: BLE001 - a reward failure is reported to every waiting client
            for _, f in live:
                f.set_exception(e)
            return
        start = 0
        for r, f in live:
            n = len(r.prompts)
            f.set_result(({k: v[start : start + n] for k, v in scores.items()}, combined[start : start + n]))
            start += n

    def submit(self, req: ScoreRequest) -> Future:
        fut: Future = Future()
        self.queue.put((req, fut))
        return fut


def _handler(server: RewardServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass  # quiet: errors are answered to the client, not logged per request

        def _reply(self, code: int, body: bytes | dict) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            if self.path.rstrip("/") != "/health":
                self._reply(404, {"error": f"unknown path {self.path!r}; use GET /health or POST /score"})
                return
            self._reply(200, {"status": "ok", "version": VERSION, "rewards": server.rewards.names,
                              "weights": server.rewards.weights, "max_batch": server.max_batch})

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            if self.path.rstrip("/") != "/score":
                self._reply(404, {"error": f"unknown path {self.path!r}; POST /score"})
                return
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self.close_connection = True
                self._reply(411, {"error": "a Content-Length header is required"})
                return
            if int(length) > server.max_bytes:
                self.close_connection = True  # the body is not read: drop the connection after answering
                self._reply(413, {"error": f"body of {int(length)} bytes exceeds the server limit of {server.max_bytes}"})
                return
            body = self.rfile.read(int(length))
            try:
                req = decode_request(body, server.max_pixels)
            except ProtocolError as e:
                self._reply(400, {"error": str(e)})
                return
            if server.stopping.is_set():
                self._reply(503, {"error": "reward server is shutting down"})
                return
            fut = server.submit(req)
            try:
                scores, combined = fut.result(timeout=server.request_timeout)
            except FutureTimeout:
                fut.cancel()
                self._reply(504, {"error": f"scoring took longer than the server's {server.request_timeout:g} s timeout"})
                return
            except Exception as e:  # noqa: BLE001 - a reward failure goes back as one line
                self._reply(500, {"error": f"reward failed: {type(e).__name__}: {e}"})
                return
            self._reply(200, encode_scores(scores, combined))

    return Handler


# ------------------------------------------------------------------------------------------------------------ CLI
USAGE = """fewstep-rl reward-server (--config FILE | --rewards a,b) [--host 127.0.0.1] [--port 18085] [--device cpu]
                        [--max_batch 32] [--timeout 120] [--max_mb 64] [--serve_seconds S]
  --config: a YAML file with a `rewards:` list as in training configs ({name, weight, <reward keys>});
  --rewards: comma-separated reward names that need no keys (e.g. jpeg,ocr)."""


def build_rewards(specs: Any) -> Any:
    """A ``MultiReward`` from a ``rewards:`` list (same format as training configs)."""
    from fewstep_rl import registry
    from fewstep_rl.config import ConfigError, build
    from fewstep_rl.rewards import MultiReward

    if not isinstance(specs, list) or not specs:
        raise ConfigError("reward-server needs a non-empty 'rewards' list, e.g. rewards: [{name: jpeg}]")
    rewards, weights = [], []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "name" not in spec:
            raise ConfigError(f"'rewards[{i}]' must be a mapping with a name, got {spec!r}")
        spec = dict(spec)
        name, weight = spec.pop("name"), spec.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"'rewards[{i}].weight': expected a number, got {weight!r}")
        cls = registry.load("rewards", name)
        try:
            rewards.append(cls(build(cls.Config, spec, f"rewards[{i}]")))
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"reward {name!r}: {e}") from None
        weights.append(float(weight))
    return MultiReward(rewards, weights)


def cmd_reward_server(argv: list[str]) -> int:
    import yaml

    from fewstep_rl.config import ConfigError

    flags = {"config": None, "rewards": None, "host": "127.0.0.1", "port": "18085", "device": "cpu",
             "max_batch": "32", "timeout": "120", "max_mb": "64", "serve_seconds": None}
    opts = dict(flags)
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("-h", "--help"):
            print(USAGE)
            return 0
        key, eq, val = tok.removeprefix("--").partition("=")
        if not tok.startswith("--") or key not in flags:
            raise ConfigError(f"reward-server: unknown argument {tok!r}; flags: {', '.join('--' + k for k in flags)}")
        if not eq:
            i += 1
            if i >= len(argv):
                raise ConfigError(f"reward-server: --{key} needs a value")
            val = argv[i]
        opts[key] = val
        i += 1
    if bool(opts["config"]) == bool(opts["rewards"]):
        raise ConfigError("reward-server: give exactly one of --config FILE or --rewards a,b")
    if opts["config"]:
        try:
            with open(opts["config"]) as f:
                cfg = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"reward-server: cannot read --config {opts['config']}: {e}") from None
        specs = cfg.get("rewards") if isinstance(cfg, dict) else None
    else:
        specs = [{"name": n.strip()} for n in opts["rewards"].split(",") if n.strip()]
    try:
        port, max_batch, timeout, max_mb = int(opts["port"]), int(opts["max_batch"]), float(opts["timeout"]), float(opts["max_mb"])
        serve_seconds = float(opts["serve_seconds"]) if opts["serve_seconds"] else None
    except ValueError as e:
        raise ConfigError(f"reward-server: bad number: {e}") from None
    if not (0 <= port < 65536 and max_batch > 0 and timeout > 0 and max_mb > 0):
        raise ConfigError("reward-server: need 0 <= port < 65536, max_batch > 0, timeout > 0, max_mb > 0")
    rewards = build_rewards(specs).to(opts["device"])
    try:
        server = RewardServer(rewards, opts["host"], port, max_batch=max_batch, request_timeout=timeout,
                              max_bytes=int(max_mb * (1 << 20)), device=opts["device"])
    except OSError as e:
        raise ConfigError(f"reward-server: cannot listen on {opts['host']}:{port}: {e}") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with server:
        print(f"reward-server: {', '.join(rewards.names)} on {server.url} (POST /score, GET /health)",
              file=sys.stderr, flush=True)
        stop.wait(serve_seconds)
    print("reward-server: stopped", file=sys.stderr, flush=True)
    return 0
