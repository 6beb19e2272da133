"""The README's quick start runs as printed (with 2 denoising steps instead of 25)."""
import re
from pathlib import Path

import matplotlib

ROOT = Path(__file__).resolve().parents[1]


def quick_start_code() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quick_start_runs_as_printed(tmp_path, monkeypatch):
    code = quick_start_code()
    assert len(code.splitlines()) <= 12 and code.count("steps = 25") == 1
    matplotlib.use("Agg")
    (tmp_path / "data").symlink_to(ROOT / "data")  # the story path is relative to the repository root
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.replace("steps = 25", "steps = 2"), "README.md", "exec"), namespace)
    story, results = namespace["story"], namespace["results"]
    assert set(results) == {"vanilla", "csa", "isolated"}
    assert all(len(result.scenes) == len(story.scenes) for result in results.values())
    assert (tmp_path / "strip.png").stat().st_size > 0
