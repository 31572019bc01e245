"""``fewstep-rl reward-server`` and the ``remote`` reward, on loopback (127.0.0.1) only: scores, batching,
concurrent clients, a slow server, a dead server, malformed and oversized requests, NaN answers, the Flow-GRPO
client mode. Every server stops by itself (context managers, ``--serve_seconds``); every client call is bounded
by its timeout and retry count."""

import http.client
import json
import pickle
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from fewstep_rl import registry
from fewstep_rl.config import ConfigError
from fewstep_rl.rewards import MultiReward, Reward
from fewstep_rl.rewards.jpeg import JpegCompressibility
from fewstep_rl.rewards.remote import RemoteConfig, RemoteReward, RewardServerError, safe_unpickle
from fewstep_rl.serve.protocol import ProtocolError, decode_images, decode_request, encode_images, encode_request
from fewstep_rl.serve.server import RewardServer, build_rewards


class MeanPixel(Reward):
    """r = mean pixel value + len(prompt); optionally slow or NaN (test double)."""

    name = "mean"
    delay = 0.0
    nan = False

    def score(self, samples, prompts, meta):
        if self.delay:
            time.sleep(self.delay)
        out = samples.mean(dim=(1, 2, 3)) + torch.tensor([float(len(p)) for p in prompts])
        if self.nan:
            out[0] = float("nan")
        return out


def _images(n, seed=0, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _client(url, **kw):
    kw.setdefault("timeout", 5.0)
    kw.setdefault("retries", 1)
    kw.setdefault("backoff", 0.0)
    return RemoteReward(RemoteConfig(url=url, **kw))


def test_protocol_round_trips_and_rejects_garbage():
    x = np.random.default_rng(0).random((2, 3, 8, 6)).astype(np.float32)
    png = decode_images(encode_images(x, "png"), 10**6)
    assert png.shape == x.shape and np.abs(png - x).max() <= 0.5 / 255 + 1e-6  # 8-bit rounding only
    f16 = decode_images(encode_images(x, "f16"), 10**6)
    np.testing.assert_allclose(f16, x, atol=1e-3)
    req = decode_request(encode_request(x, ["a", "b"], [{"k": 1}, {}], "f16"), 10**6)
    assert req.prompts == ["a", "b"] and req.meta == [{"k": 1}, {}]
    bad = [
        (b"{not json", "not JSON"),
        (json.dumps({"version": 2}).encode(), "version must be 1"),
        (json.dumps({"version": 1, "images": {"encoding": "bmp"}, "prompts": []}).encode(), "encoding in"),
        (json.dumps({"version": 1, "pickle": 1}).encode(), "unknown keys"),
        (encode_request(x, ["a", "b", "c"][:2], [{}], "png"), "'meta' must be a list of 2"),
    ]
    for body, msg in bad:
        with pytest.raises(ProtocolError, match=msg):
            decode_request(body, 10**6)
    with pytest.raises(ProtocolError, match="pixels"):
        decode_request(encode_request(x, ["a", "b"], [{}, {}], "f16"), 50)
    field = encode_images(x, "f16")
    field["data"] = field["data"][:-8]
    with pytest.raises(ProtocolError, match="bytes"):
        decode_images(field, 10**6)


def test_scores_match_the_local_reward_in_both_encodings():
    local = JpegCompressibility()
    x = _images(3, size=32)
    with RewardServer(MultiReward([JpegCompressibility()], [2.0])) as srv:
        png = _client(srv.url, key="jpeg")
        assert registry.load("rewards", "remote") is RemoteReward
        torch.testing.assert_close(png(x, ["a", "b", "c"]), local(x, ["a", "b", "c"]))  # PNG is exact for 8-bit
        combined = _client(srv.url, encoding="f16")(x, ["a", "b", "c"])  # default key: the weighted sum (w = 2)
        assert combined.shape == (3,) and torch.isfinite(combined).all()
        assert (combined < 0).all() and combined.dtype == torch.float32
        info = png.health()
        assert info["rewards"] == ["jpeg"] and info["weights"] == [2.0]


def test_concurrent_clients_are_batched_and_get_their_own_scores():
    reward = MeanPixel()
    reward.delay = 0.3  # the first request holds the scorer while the others queue up
    with RewardServer(MultiReward([reward]), max_batch=64) as srv:
        clients = [_client(srv.url, key="mean") for _ in range(8)]  # e.g. one per training rank
        inputs = [(_images(2, seed=i), [f"p{i}", "q" * i]) for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda c, a: c(*a), clients, inputs))
    for (x, prompts), out in zip(inputs, outs):
        torch.testing.assert_close(out, x.mean(dim=(1, 2, 3)) + torch.tensor([float(len(p)) for p in prompts]),
                                   rtol=0, atol=0.5 / 255 + 1e-6)  # PNG: each pixel within half a level
    assert sum(srv.batches) == 16 and len(srv.batches) < 8 and max(srv.batches) > 2  # queued requests shared calls


def test_submit_overlaps_with_the_caller():
    reward = MeanPixel()
    reward.delay = 0.5
    with RewardServer(MultiReward([reward])) as srv:
        client = _client(srv.url, key="mean")
        t0 = time.monotonic()
        fut = client.submit(_images(2), ["a", "b"])
        submitted = time.monotonic() - t0
        assert not fut.done() and submitted < 0.3  # the caller is free while the server scores
        assert fut.result(timeout=10).shape == (2,)
        client.close()


def test_slow_server_times_out_with_bounded_retries():
    reward = MeanPixel()
    reward.delay = 1.5
    with RewardServer(MultiReward([reward]), request_timeout=30) as srv:
        client = _client(srv.url, timeout=0.3, retries=2, backoff=0.05)
        t0 = time.monotonic()
        with pytest.raises(RewardServerError, match="failed 3 times.*(timed out|Timeout)"):
            client(_images(1), ["a"])
        assert client.calls == 1 + 3 and time.monotonic() - t0 < 3 * 0.3 + 0.05 + 0.1 + 2.0  # health + 3 posts
    with RewardServer(MultiReward([reward]), request_timeout=0.2) as srv:  # the server's own timeout: 504
        client = _client(srv.url, timeout=10, retries=0)
        with pytest.raises(RewardServerError, match="504.*0.2 s timeout"):
            client(_images(1), ["a"])


def test_dead_server_fails_fast_with_a_clear_error():
    srv = RewardServer(MultiReward([MeanPixel()])).start()
    url = srv.url
    srv.stop()
    t0 = time.monotonic()
    with pytest.raises(RewardServerError, match=r"not reachable.*fewstep-rl reward-server"):
        _client(url)
    client = _client(url, check_health=False, retries=2, backoff=0.01)
    with pytest.raises(RewardServerError, match=r"failed 3 times.*restart the server and resume"):
        client(_images(1), ["a"])
    assert client.calls == 3 and time.monotonic() - t0 < 5


def test_malformed_and_oversized_requests_get_4xx_and_are_not_retried():
    with RewardServer(MultiReward([MeanPixel()]), max_bytes=4000) as srv:
        host, port = srv.httpd.server_address[:2]

        def post(body, path="/score", headers=None):
            conn = http.client.HTTPConnection(host, port, timeout=5)
            conn.request("POST", path, body=body, headers=headers or {})
            r = conn.getresponse()
            out = r.status, json.loads(r.read())
            conn.close()
            return out

        code, obj = post(b"\x80\x03}q\x00.")  # a pickle is not JSON
        assert code == 400 and "not JSON" in obj["error"]
        code, obj = post(json.dumps({"version": 1, "images": {"encoding": "png", "data": ["AAAA"]},
                                     "prompts": ["a"]}).encode())
        assert code == 400 and "not a readable PNG" in obj["error"]
        code, obj = post(b"x" * 5000)
        assert code == 413 and "exceeds the server limit of 4000" in obj["error"]
        code, obj = post(b"{}", path="/other")
        assert code == 404
        with urllib.request.urlopen(f"{srv.url}/health", timeout=5) as r:  # the server is still fine
            assert json.loads(r.read())["status"] == "ok"
        client = _client(srv.url, retries=3, encoding="f16")
        with pytest.raises(RewardServerError, match="HTTP 413"):
            client(_images(2, size=24), ["a", "b"])  # 2·3·24²·2 bytes > 4000
        assert client.calls == 2  # health + one post: a 4xx is not retried


def test_nan_from_the_server_is_an_error_not_a_score():
    reward = MeanPixel()
    reward.nan = True
    with RewardServer(MultiReward([reward])) as srv:
        client = _client(srv.url, key="mean", retries=3)
        # the server's reward boundary refuses the NaN (naming the reward); the client's retries stay bounded
        with pytest.raises(RewardServerError, match=r"reward 'mean' returned 1 non-finite score\(s\) \(NaN\)"):
            client(_images(2), ["a", "b"])
        assert client.calls == 5  # health + the first post + 3 bounded retries, then a clear error


def test_wrong_key_and_failing_reward():
    class Boom(MeanPixel):
        name = "boom"

        def score(self, samples, prompts, meta):
            raise RuntimeError("model exploded")

    with RewardServer(MultiReward([Boom()])) as srv:
        with pytest.raises(RewardServerError, match=r"serves \['boom'\], not 'nope'"):
            _client(srv.url, key="nope")
        client = _client(srv.url, retries=1)
        with pytest.raises(RewardServerError, match="model exploded"):
            client(_images(1), ["a"])
        assert client.calls == 3  # a 500 is retried once


class _FlowGrpoServer:
    """A stand-in for a flow_grpo reward server (GenEval interface): pickle in, pickle out."""

    def __init__(self, answer):
        outer = self
        self.seen = []

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                data = pickle.loads(self.rfile.read(int(self.headers["Content-Length"])))  # test-side only
                outer.seen.append(data)
                body = answer(data)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *a):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_flow_grpo_client_mode():
    def geneval(data):
        n = len(data["images"])
        return pickle.dumps({"scores": [0.5] * n, "rewards": np.arange(n, dtype=np.float64) / 10,
                             "strict_rewards": [1.0] * n, "group_rewards": {}, "group_strict_rewards": {}})

    fs = _FlowGrpoServer(geneval)
    with fs as url:
        client = _client(url, protocol="flow_grpo", batch_size=2)
        out = client(_images(3), ["a", "b", "c"], [{"tag": "single_object"}, {}, {"n": np.int64(2)}])
    torch.testing.assert_close(out, torch.tensor([0.0, 0.1, 0.0]))  # batches of 2: [0, .1] then [0]
    assert len(fs.seen) == 2 and fs.seen[0]["images"][0][:2] == b"\xff\xd8"  # JPEG bytes, as flow_grpo sends
    assert fs.seen[0]["meta_datas"][0] == {"tag": "single_object"} and fs.seen[1]["meta_datas"] == [{"n": 2}]

    class Evil:
        def __reduce__(self):
            return (eval, ("1",))

    evil = _FlowGrpoServer(lambda d: pickle.dumps({"rewards": [Evil()]}))
    with evil as url, pytest.raises(RewardServerError, match="refusing to unpickle builtins.eval"):
        _client(url, protocol="flow_grpo")(_images(1), ["a"])
    with pytest.raises(pickle.UnpicklingError):
        safe_unpickle(pickle.dumps(Evil()))


def test_bad_client_config():
    with pytest.raises(ConfigError, match="url must look like"):
        from fewstep_rl.config import build

        build(RemoteConfig, {"url": "localhost:1"}, "rewards[0]")


def test_build_rewards_and_cli(tmp_path):
    with pytest.raises(ConfigError, match="non-empty 'rewards' list"):
        build_rewards([])
    cfg = tmp_path / "r.yaml"
    cfg.write_text("rewards:\n  - {name: jpeg, weight: 0.5, quality: 90}\n")
    proc = subprocess.Popen([sys.executable, "-m", "fewstep_rl.cli", "reward-server", "--config", str(cfg),
                             "--port", "0", "--serve_seconds", "20"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "reward-server: jpeg on http://127.0.0.1:" in line, line
        url = line.split(" on ")[1].split()[0]
        client = _client(url, key="jpeg")
        assert client(_images(1, size=32), ["x"]).item() < 0
        proc.terminate()
        assert proc.wait(timeout=120) == 0 and "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    bad = subprocess.run([sys.executable, "-m", "fewstep_rl.cli", "reward-server", "--rewards", "jpegg"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "did you mean 'jpeg'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


DYING = '''
import torch
from fewstep_rl.rewards import Reward
from fewstep_rl.rewards.remote import RewardServerError


class Dying(Reward):
    """A reward whose server "dies" on its 3rd call."""

    name = "dying"
    differentiable = False
    calls = 0

    def score(self, samples, prompts, meta):
        type(self).calls += 1
        if type(self).calls >= 3:
            raise RewardServerError("reward server http://127.0.0.1:1 failed 4 times (last: refused)")
        return samples[:, 0]
'''


@pytest.mark.slow  # a real `fit` subprocess (~30 s on 2 cores)
def test_fit_stops_with_a_checkpoint_when_the_reward_server_dies(tmp_path):
    (tmp_path / "dying_reward.py").write_text(DYING)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rewards:\n  - {name: 'dying_reward:Dying'}\n")
    rd = tmp_path / "run"
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tmp_path)}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "fewstep_rl.cli", "fit", "--method", "flow_grpo", "--world", "toy2d",
                        "--config", str(cfg), "--trainer.max_steps", "50", "--trainer.run_dir", str(rd),
                        "--trainer.progress_bar", "false", "--trainer.eval_every", "0"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 3, p.stderr[-2000:]
    assert "error: reward server http://127.0.0.1:1 failed" in p.stderr and "--ckpt_path" in p.stderr
    assert "Traceback" not in p.stderr
    ck = torch.load(rd / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert "fewstep" in ck and ck["global_step"] < 50  # stopped early, progress kept
    assert time.monotonic() - t0 < 300
