"""The README's "Write a method, a reward, a world" guide runs as written: its three files are extracted from the
README, and the `fit` command it shows trains the plugin method, which raises the plugin reward."""

import json
import re
import shlex
import sys
from pathlib import Path

from fewstep_rl.cli import main

README = Path(__file__).parents[1] / "README.md"


def guide() -> str:
    text = README.read_text()
    start = text.index("## Write a method, a reward, a world")
    return text[start : text.index("\n## ", start + 10)]


def test_readme_plugin_guide_runs(tmp_path, monkeypatch, capsys):
    g = guide()
    files = re.findall(r"```python\n# (my_plugin/\w+\.py)\n(.*?)```", g, re.S)
    assert [f for f, _ in files] == ["my_plugin/rewards.py", "my_plugin/method.py", "my_plugin/world.py"]
    for name, body in files:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(body)
    (tmp_path / "my_plugin" / "__init__.py").write_text("")
    cmd = re.search(r"```bash\n(fewstep-rl fit .*?)```", g, re.S).group(1).replace("\\\n", " ")
    argv = shlex.split(cmd)[1:]
    argv[argv.index("--trainer.max_steps") + 1] = "60"  # the guide says 300; 60 is enough to see the reward rise
    argv[argv.index("--trainer.eval_every") + 1] = "30"
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    try:
        assert main([*argv, "--trainer.progress_bar", "false", "--trainer.run_dir", str(tmp_path / "run")]) == 0
    finally:
        for m in [m for m in sys.modules if m.startswith("my_plugin")]:
            del sys.modules[m]
    rows = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    r = [row["reward/neg_distance"] for row in rows]
    assert [row["iteration"] for row in rows] == [0, 30, 60]
    assert r[-1] > r[0] + 0.5, r  # samples move toward the target (3, 0)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
