"""Execute the notebooks in reading order with papermill.

    python scripts/run_notebooks.py                 # all notebooks, full parameters
    python scripts/run_notebooks.py --quick         # fast parameters (what the tests use)
    python scripts/run_notebooks.py 02_otsu_masks   # a subset, by name
    python scripts/run_notebooks.py -p backbone sdxl -p model_id /models/sdxl   # any parameter

Executed copies go to build/notebooks/ (ignored by git), each with a ``<name>.claims.json`` of its
key numbers beside it (``osa_lib.figures.record_claims``); figures go to figures/ (or $OSA_FIGURES_DIR).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import papermill

ROOT = Path(__file__).resolve().parents[1]


def notebooks(names: list[str]) -> list[Path]:
    every = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if not names:
        return every
    chosen = [p for p in every if any(p.stem.startswith(n) for n in names)]
    if len(chosen) < len(names):
        sys.exit(f"unknown notebook in {names}; notebooks are {[p.stem for p in every]}")
    return chosen


def run(path: Path, parameters: dict, out_dir: Path) -> float:
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    papermill.execute_notebook(str(path), str(out_dir / path.name), parameters=parameters,
                               cwd=str(path.parent), kernel_name="python3", progress_bar=False)
    return time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="notebook name prefixes (default: all)")
    parser.add_argument("--quick", action="store_true", help="fast parameters, as in the tests")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "notebooks")
    args = parser.parse_args()
    os.environ.setdefault("OSA_CLAIMS_DIR", str(args.out))  # each notebook's key numbers, beside it
    parameters = {"quick": args.quick}
    for name, value in args.p:
        parameters[name] = _literal(value)
    for path in notebooks(args.names):
        print(f"running {path.name} ...", flush=True)
        print(f"  done in {run(path, parameters, args.out):.0f} s -> {args.out / path.name}", flush=True)


def _literal(text: str):
    import ast
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


if __name__ == "__main__":
    main()
