"""Records a run leaves as text: a notebook's claims, Markdown tables, results files with their provenance.

- ``record_claims`` writes a notebook's key numbers (``<claims_dir>/<name>.claims.json``), which
  ``tests/test_notebooks.py`` asserts;
- ``markdown_table`` formats rows for notebooks and results files;
- ``write_results`` writes a ``results/`` file headed by ``results_header`` (the command, from
  ``command_line``, the git commit and the machine).
Every file is written to a temporary name, then renamed.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import numpy as np

__all__ = ["claims_dir", "record_claims", "markdown_table", "results_header", "command_line", "write_results"]

def claims_dir() -> Path:
    """``$OSA_CLAIMS_DIR`` if set (tests and ``scripts/run_notebooks.py`` set it to where the executed
    notebooks go), else ``<repo>/build/notebooks``."""
    folder = Path(os.environ.get("OSA_CLAIMS_DIR", Path(__file__).resolve().parents[1] / "build" / "notebooks"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _plain(value):
    """numpy / torch scalars and arrays -> JSON values; NaN -> None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy and torch scalars / arrays
        return _plain(value.tolist())
    if isinstance(value, float) and value != value:
        return None
    return value


def record_claims(name: str, claims: dict) -> Path:
    """Write a notebook's key numbers to ``<claims_dir>/<name>.claims.json`` (temporary file, then rename),
    so ``tests/test_notebooks.py`` can assert what the notebook prints.

    Args:
        name: the notebook's stem, e.g. ``"02_otsu_masks"``.
        claims: JSON-able values (numpy / torch numbers and arrays are converted; NaN becomes null).
    """
    import json
    path = claims_dir() / f"{name}.claims.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_plain(claims), indent=1, allow_nan=False))
    os.replace(tmp, path)
    return path


def markdown_table(rows: list[dict], digits: int = 2) -> str:
    """A list of dicts as a Markdown table (notebooks show it with ``display(Markdown(...))``)."""
    if not rows:
        return "*(no rows)*"
    keys = list(rows[0])
    def cell(v):
        if isinstance(v, float):
            return "n/a" if np.isnan(v) else f"{v:.{digits}f}"
        return "n/a" if v is None else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def results_header(command: str) -> str:
    """The provenance line of a results file: the command, the commit and the machine it ran on."""
    import platform
    import subprocess
    import torch
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return (f"Written by `{command}` at commit {commit} on {platform.node() or 'an unnamed machine'} "
            f"({device}, {platform.system()}, torch {torch.__version__}). Do not edit by hand: re-run the command.")


def command_line(program: str, argv: list[str] | None = None) -> str:
    """The command a results file records: ``program`` and its arguments (``sys.argv[1:]`` when
    ``argv`` is None), quoted so that it pastes back into a shell as given."""
    return f"{program} {shlex.join(sys.argv[1:] if argv is None else argv)}"


def write_results(path, title: str, body: str, command: str) -> Path:
    """Write a Markdown results file: title, provenance (``results_header``), then ``body``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"# {title}\n\n{results_header(command)}\n\n{body.rstrip()}\n")
    os.replace(tmp, path)
    return path
