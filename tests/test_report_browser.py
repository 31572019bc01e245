"""``report.html`` of a real (tiny) comparison, opened in a real headless browser (Debian's ``chromium``, installed by
``.ci/run``): a screenshot is taken, every image and plot has loaded, and every method's row is present.

A missing browser fails the test with a message saying how to install it; it never skips."""

import re
import shutil
import subprocess

import pytest
import yaml

from fewstep_rl.cli import main

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def browser() -> str:
    for b in BROWSERS:
        if path := shutil.which(b):
            return path
    pytest.fail("no headless browser found (looked for chromium, chromium-browser, google-chrome): the report test "
                "needs Debian's chromium — `apt-get install -y chromium` (.ci/run installs it when run as root)")


def headless(*args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--no-first-run", "--virtual-time-budget=10000"]
    return subprocess.run([browser(), *flags, *args], capture_output=True, text=True, timeout=180)


def test_report_in_headless_browser(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "world": {"name": "toy2d", "hidden": 32, "eval_samples": 64},
        "rewards": [{"name": "linear", "w": [1.0, 0.0]}],
        "judges": [{"name": "region", "low": [1.0, -1.0], "high": [3.0, 1.0]}],
        "beta": 0.25,
        "budget": {"iterations": 6},
        "eval": {"samples": 64, "grid_prompts": 2, "teacher_steps": 4},
        "monitor": {"every": 3, "samples": 32},
        "trainer": {"eval_every": 3, "eval_samples": 64, "progress_bar": False},
        "methods": [{"name": "refl", "method": {"batch_size": 8}},
                    {"name": "didr", "label": "didr-small", "method": {"batch_size": 8}}],
    }))
    out = tmp_path / "out"
    assert main(["compare", str(cfg), "--out", str(out), "--jobs", "2"]) == 0, capsys.readouterr().err[-3000:]
    report = out / "report.html"
    page = report.read_text()
    assert "src='http" not in page and "src=\"http" not in page  # self-contained
    shot = tmp_path / "report.png"
    p = headless("--window-size=1400,4000", f"--screenshot={shot}", report.as_uri())
    assert shot.is_file(), p.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1400, 4000)
    lo, hi = img.getextrema()
    assert lo < 50 and hi > 200  # text and plots drawn, not a blank page
    dom = headless("--dump-dom", report.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    attrs = dict(re.findall(r'data-(\w+)="(\d+)"', body))
    n_img = page.count("<img ")
    # curves (2), frontiers (2), sample grids (2 prompts), cost (1): every one decoded by the browser
    assert n_img >= 7 and attrs == {"loaded": str(n_img), "broken": "0", "images": str(n_img)}, attrs
    assert len(re.findall(r'<img[^>]*data-ok="1"', dom.stdout)) == n_img
    for label in ("teacher", "refl", "didr-small"):
        assert re.search(rf"<tr data-method=\"{re.escape(label)}\">\s*<td>{re.escape(label)}</td>", dom.stdout), label
    md = (out / "results.md").read_text()
    assert "| refl | refl | done |" in md and "| didr-small | didr | done |" in md
