"""``remote``: a black-box reward scored by a reward server over HTTP (``fewstep-rl reward-server``, or an existing
Flow-GRPO-style server).

Failure policy (the opposite of "999 retries", flow_grpo#232): at construction the server's ``/health`` must answer
(else one clear error naming the URL and how to start the server); each request has a ``timeout``; connection
errors, timeouts and 5xx answers are retried at most ``retries`` times with exponential backoff
``backoff · 2^k`` (capped at ``max_backoff``); 4xx answers (a malformed request) and non-finite or missing scores
are not retried. Any failure raises :class:`RewardServerError`, which stops training (the ``fit`` command writes a
checkpoint first); nothing is ever silently scored 0.

Overlap: :meth:`RemoteReward.submit` sends the request from a background thread and returns a ``Future``, so a
method can score one batch while it computes the next training step; ``reward(x, prompts)`` is
``submit(...).result()``.

Protocols:

* ``fewstep`` (default) — the typed JSON protocol of :mod:`fewstep_rl.serve.protocol` (images as base64 PNG or raw
  float16), ``POST {url}/score``.
* ``flow_grpo`` — the interface of yifan123/flow_grpo's reward servers (GenEval, DeQA, UnifiedReward ports 1808x):
  ``POST {url}/`` with a pickled ``{"images": [JPEG bytes], "prompts": [...], "meta_datas": [...],
  "only_strict": false}``, answered by a pickled dict whose ``response_key`` list holds the scores (``rewards``
  for GenEval, ``outputs`` for DeQA/UnifiedReward). Departure from "never pickle": this mode exists only so that
  users' existing servers plug in; the answer is read with an allow-list unpickler that builds only plain
  containers, numbers, strings and numpy arrays/scalars, never arbitrary objects. These servers have no
  ``/health``; the start-up check is a TCP connect.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from fewstep_rl.config import knob
from fewstep_rl.rewards.base import Reward
from fewstep_rl.serve.protocol import ProtocolError, check_values, decode_scores, encode_request


class RewardServerError(RuntimeError):
    """The reward server is down, too slow, or answered garbage: training must stop (not spin, not score 0)."""


@dataclasses.dataclass
class RemoteConfig:
    """Knobs of :class:`RemoteReward`."""

    url: str = knob("http://127.0.0.1:18085", "reward server base URL")
    protocol: Literal["fewstep", "flow_grpo"] = knob("fewstep", "wire protocol (see the module docstring)")
    key: str | None = knob(None, "fewstep: which served reward to use (default: the server's weighted sum)")
    response_key: str = knob("rewards", "flow_grpo: the response list holding the scores (GenEval: rewards)")
    encoding: Literal["png", "f16"] = knob("png", "fewstep: images as 8-bit PNG or raw float16")
    timeout: float = knob(60.0, "seconds per request")
    retries: int = knob(3, "retries after a connection error, timeout or 5xx (then RewardServerError)")
    backoff: float = knob(0.5, "first retry delay in seconds (doubles each retry)")
    max_backoff: float = knob(8.0, "largest retry delay in seconds")
    batch_size: int = knob(64, "images per request (larger batches are split)")
    check_health: bool = knob(True, "check that the server answers when the reward is built")

    def __post_init__(self) -> None:
        if self.protocol not in ("fewstep", "flow_grpo"):
            raise ValueError(f"remote reward: protocol must be 'fewstep' or 'flow_grpo', got {self.protocol!r}")
        if self.encoding not in ("png", "f16"):
            raise ValueError(f"remote reward: encoding must be 'png' or 'f16', got {self.encoding!r}")
        if not (self.timeout > 0 and self.retries >= 0 and self.backoff >= 0 and self.batch_size > 0):
            raise ValueError("remote reward: need timeout > 0, retries >= 0, backoff >= 0, batch_size > 0")
        parsed = urllib.parse.urlparse(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"remote reward: url must look like http://HOST:PORT, got {self.url!r}")


class _Transient(Exception):
    """A failure worth retrying (connection refused/reset, timeout, 5xx)."""


_SAFE_GLOBALS = {
    ("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "int", "float", "bool",
                              "complex", "bytearray", "slice")
} | {("collections", "OrderedDict"), ("collections", "defaultdict"), ("numpy", "dtype"), ("numpy", "ndarray"),
     ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
     ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
     ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a reward server")
        return super().find_class(module, name)


def safe_unpickle(data: bytes) -> Any:
    """Unpickle plain data only (containers, numbers, strings, numpy arrays/scalars)."""
    return _SafeUnpickler(io.BytesIO(data)).load()


class RemoteReward(Reward):
    """Scores from a reward server; black box (``no_grad``)."""

    name = "remote"
    differentiable = False
    Config = RemoteConfig

    def __init__(self, cfg: RemoteConfig | None = None) -> None:
        super().__init__(cfg)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.calls = 0  # HTTP attempts made (for tests and logs)
        if self.cfg.check_health:
            self.health()

    # ------------------------------------------------------------------ transport
    def _post(self, path: str, body: bytes, content_type: str) -> bytes:
        req = urllib.request.Request(self.cfg.url.rstrip("/") + path, data=body, method="POST",
                                     headers={"Content-Type": content_type})
        return self._open(req)

    def _open(self, req: urllib.request.Request) -> bytes:
        self.calls += 1
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            if e.code >= 500:
                raise _Transient(f"HTTP {e.code}: {detail}") from None
            raise RewardServerError(f"reward server {self.cfg.url} rejected the request (HTTP {e.code}): {detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise _Transient(f"{type(reason).__name__}: {reason}") from None

    def _with_retries(self, fn: Any) -> Any:
        last = ""
        for attempt in range(self.cfg.retries + 1):
            try:
                return fn()
            except _Transient as e:
                last = str(e)
                if attempt < self.cfg.retries:
                    time.sleep(min(self.cfg.max_backoff, self.cfg.backoff * 2**attempt))
        raise RewardServerError(
            f"reward server {self.cfg.url} failed {self.cfg.retries + 1} times (last: {last}); training stops "
            "here: restart the server and resume from the checkpoint"
        )

    def health(self) -> dict:
        """``GET /health`` (fewstep) or a TCP connect (flow_grpo); :class:`RewardServerError` if unreachable."""
        if self.cfg.protocol == "flow_grpo":
            u = urllib.parse.urlparse(self.cfg.url)
            try:
                socket.create_connection((u.hostname, u.port or 80), timeout=self.cfg.timeout).close()
            except OSError as e:
                raise RewardServerError(f"reward server {self.cfg.url} is not reachable ({e}); start it first") from None
            return {"status": "ok"}
        try:
            body = self._open(urllib.request.Request(self.cfg.url.rstrip("/") + "/health"))
        except _Transient as e:
            raise RewardServerError(
                f"reward server {self.cfg.url} is not reachable ({e}); start it with "
                "`fewstep-rl reward-server --config rewards.yaml --port PORT`"
            ) from None
        import json

        try:
            info = json.loads(body)
        except json.JSONDecodeError:
            raise RewardServerError(f"{self.cfg.url}/health did not answer JSON: is this a fewstep reward server?") from None
        if self.cfg.key is not None and self.cfg.key not in info.get("rewards", []):
            raise RewardServerError(f"reward server {self.cfg.url} serves {info.get('rewards')}, not {self.cfg.key!r}")
        return info

    # ------------------------------------------------------------------ scoring
    def _score_chunk(self, images: np.ndarray, prompts: list[str], meta: list[dict]) -> list[float]:
        n = len(prompts)
        if self.cfg.protocol == "fewstep":
            body = encode_request(images, prompts, meta, self.cfg.encoding)
            raw = self._with_retries(lambda: self._post("/score", body, "application/json"))
            try:
                return decode_scores(raw, n, self.cfg.key)
            except ProtocolError as e:
                raise RewardServerError(f"reward server {self.cfg.url} answered badly: {e}") from None
        body = pickle.dumps({"images": _jpegs(images), "prompts": prompts, "meta_datas": meta, "only_strict": False})
        raw = self._with_retries(lambda: self._post("/", body, "application/octet-stream"))
        try:
            obj = safe_unpickle(raw)
            if not isinstance(obj, dict) or self.cfg.response_key not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ProtocolError(f"no {self.cfg.response_key!r} in the answer (it has {keys})")
            values = obj[self.cfg.response_key]
            return check_values(np.asarray(values, dtype=object).reshape(-1).tolist(), n)
        except (pickle.UnpicklingError, ProtocolError, EOFError, ValueError, TypeError) as e:
            raise RewardServerError(f"reward server {self.cfg.url} answered badly: {e}") from None

    def _score_all(self, images: np.ndarray, prompts: list[str], meta: list[dict]) -> list[float]:
        out: list[float] = []
        bs = self.cfg.batch_size
        for i in range(0, len(prompts), bs):
            out += self._score_chunk(images[i : i + bs], prompts[i : i + bs], meta[i : i + bs])
        return out

    def submit(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict] | None = None) -> Future:
        """Start scoring in a background thread; the ``Future`` gives ``Tensor[B]`` (float32, on the samples' device)."""
        if samples.dim() != 4 or samples.shape[1] != 3:
            raise ValueError(f"reward 'remote' expects images (B, 3, H, W) in [0, 1], got {tuple(samples.shape)}")
        meta = list(meta) if meta is not None else [{} for _ in prompts]
        if len(prompts) != samples.shape[0] or len(meta) != samples.shape[0]:
            raise ValueError(f"reward 'remote': got {samples.shape[0]} samples, {len(prompts)} prompts, {len(meta)} meta")
        images = samples.detach().float().cpu().numpy()  # copied now: the caller may reuse the buffer
        device = samples.device
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="remote-reward")
        fut = self._pool.submit(self._score_all, images, list(prompts), _jsonable(meta))
        out: Future = Future()

        def done(f: Future) -> None:
            e = f.exception()
            if e is not None:
                out.set_exception(e)
            else:
                out.set_result(torch.tensor(f.result(), dtype=torch.float32, device=device))

        fut.add_done_callback(done)
        return out

    def score(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict]) -> Tensor:
        return self.submit(samples, prompts, meta).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


def _jpegs(images: np.ndarray) -> list[bytes]:
    from PIL import Image

    u8 = (np.clip(images, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    out = []
    for img in u8:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def _jsonable(meta: list[dict]) -> list[dict]:
    """Meta dicts with tensors/arrays turned into lists (what JSON can carry)."""

    def conv(v: Any) -> Any:
        if isinstance(v, Tensor):
            return v.detach().cpu().tolist()
        if isinstance(v, np.ndarray):
            return v.tolist()
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return [conv(m) for m in meta]
