"""Execute the notebooks in reading order with papermill.

    python scripts/run_notebooks.py                 # all notebooks, full parameters
    python scripts/run_notebooks.py --quick         # fast parameters (what the tests use)
    python scripts/run_notebooks.py 02_otsu_masks   # a subset, by name (or prefix: 02)
    python scripts/run_notebooks.py 01 04 -p backbone_name sdxl -p model_id /models/sdxl
    python scripts/run_notebooks.py 05 -p lams 0,1.1,2   # lists as the notebook declares them
    python scripts/run_notebooks.py --jobs 1        # one notebook at a time (default: 3 at once on 2 cores)

Everything is checked before the first notebook runs: unknown notebook names, parameters that
none of the chosen notebooks declares (read from each one's ``parameters`` cell with
``papermill.inspect_notebook``) and values that do not parse as the declared type stop it with
the accepted names and parameters. A parameter goes only to the notebooks that declare it.
``--quick`` never overrides an explicit ``-p``: a ``-p`` of a value that a notebook's quick mode
replaces (``steps = 6 if quick else num_steps``) is refused with what to do instead.

Executed copies go to build/notebooks/ (ignored by git); story metrics are cached in build/cache/ (keyed by weights and code), each with a ``<name>.claims.json`` of its
key numbers beside it (``osa_lib.figures.record_claims``); figures go to figures/ (or $OSA_FIGURES_DIR).
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from queue import Empty

import nbformat
import papermill

__all__ = ["RunnerError", "poll_in_slices", "execute_in_child", "notebooks", "declared_parameters", "quick_replaces", "parse_value", "plan", "run_all", "timing_table", "main"]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"


class RunnerError(ValueError):
    """A command line the runner refuses before running anything, with what is accepted."""


def notebooks(names: list[str], folder: Path = NOTEBOOK_DIR) -> list[Path]:
    """The notebooks whose names start with one of ``names`` (all when empty), in reading order."""
    every = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    unknown = [n for n in names if not any(p.stem.startswith(n) for p in every)]
    if unknown:
        raise RunnerError(f"unknown notebook name(s) {unknown}; the notebooks are {[p.stem for p in every]} "
                          f"(a name or a prefix of it, e.g. 02)")
    return [p for p in every if not names or any(p.stem.startswith(n) for n in names)]


def declared_parameters(path: Path) -> dict[str, dict]:
    """The notebook's ``parameters`` cell: name -> {inferred_type_name, default, help}."""
    return papermill.inspect_notebook(str(path))


def quick_replaces(path: Path, declared: dict) -> set[str]:
    """Parameters whose value the notebook's quick mode replaces: those after ``if quick else``
    (``steps = 6 if quick else num_steps``) and those on a line that quick caps
    (``[...lams...][: 2 if quick else None]``)."""
    replaced = set()
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "code" or "parameters" in cell.metadata.get("tags", []):
            continue
        for line in cell.source.splitlines():
            if "if quick else" not in line:
                continue
            scope = line if "if quick else None" in line else line.split("if quick else", 1)[1]
            replaced |= {name for name in declared if re.search(rf"\b{name}\b", scope)}
    return replaced


def parse_value(name: str, text: str, info: dict):
    """``text`` as the declared type of parameter ``name``; ``RunnerError`` if it is not one."""
    kind, default = info.get("inferred_type_name"), info.get("default", "")

    def refuse(accepted: str):
        raise RunnerError(f"-p {name} {text!r}: {name} is declared as {kind} (default {default}); "
                          f"give {accepted}")

    if kind == "int":
        if not re.fullmatch(r"[+-]?\d+", text.strip()):
            refuse("an integer, e.g. -p " + name + " " + default)
        return int(text)
    if kind == "float":
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            refuse("a finite number, e.g. -p " + name + " " + default)
        return value
    if kind == "bool":
        words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if text.strip().lower() not in words:
            refuse("true or false")
        return words[text.strip().lower()]
    if kind == "str":
        if "," in default and text.strip()[:1] in "[(":  # a list for a comma-separated parameter
            try:
                items = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                refuse(f"comma-separated values, e.g. -p {name} {default.strip(chr(34))}")
            return ",".join(str(x) for x in items)
        return text
    try:  # a parameter papermill could not type: a Python literal, else the text
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _accepted(declared: dict[Path, dict]) -> str:
    lines = []
    for path, params in declared.items():
        lines.append(f"  {path.stem}:")
        lines += [f"    {n}: {i['inferred_type_name']} = {i['default']}  # {i['help']}" for n, i in params.items()]
    return "\n".join(lines)


def plan(names: list[str], pairs: list[tuple[str, str]], quick: bool,
         folder: Path = NOTEBOOK_DIR) -> list[tuple[Path, dict]]:
    """Check the whole command line and return (notebook, parameters) to run, or raise ``RunnerError``."""
    chosen = notebooks(names, folder)
    declared = {p: declared_parameters(p) for p in chosen}
    given: dict[str, str] = {}
    for name, text in pairs:
        if name in given:
            raise RunnerError(f"-p {name} is given twice ({given[name]!r} and {text!r}); give it once")
        given[name] = text
    unknown = [n for n in given if not any(n in params for params in declared.values())]
    if unknown:
        raise RunnerError(f"unknown parameter(s) {unknown} for {[p.stem for p in chosen]}. "
                          f"Accepted parameters (name: type = default):\n{_accepted(declared)}")
    runs = []
    for path, params in declared.items():
        values = {n: parse_value(n, t, params[n]) for n, t in given.items() if n in params}
        if quick and "quick" not in given:
            clash = sorted(quick_replaces(path, params) & set(values))
            if clash:
                raise RunnerError(f"--quick replaces {clash} in {path.stem}, so -p {clash[0]} would be ignored; "
                                  f"drop --quick to use your value, or drop -p {clash[0]}")
            values["quick"] = True
        runs.append((path, values))
    return runs


#: Papermill runs in a child process of its own (``execute_in_child``): the kernel's client (zmq
#: sockets, an asyncio loop) is not shared between the runner's threads. A cell past its time limit
#: exits with TIMED_OUT.
_EXECUTE = """
import json, sys
sys.path.insert(0, sys.argv[2])
from run_notebooks import execute_in_child
sys.exit(execute_in_child(json.loads(sys.argv[1])))
"""
TIMED_OUT = 3
CELL_TIMEOUT_S = 900  # no cell of the main job takes 5 minutes on 2 busy cores; one past 15 has hung
POLL_SLICE_S = 1.0  # the longest the client waits on a socket before looking at it again


def poll_in_slices(get_msg, slice_s: float = POLL_SLICE_S):
    """``get_msg`` (jupyter_client's async channel method) that waits at most ``slice_s`` at a time
    and looks again until its own ``timeout`` (``None``: forever) has passed.

    Why: pyzmq's asyncio poll can miss the wake-up of a message that has arrived (nbclient issue
    #312, widget cells). The client then sleeps until the poll's timeout, where pyzmq looks at the
    socket once more and finds the message. nbclient waits for a cell's reply with the whole cell
    time limit as that timeout, so notebook 01's widget cell, which the kernel had answered in
    70 ms (its reply is stamped 12:26:52.709), finished after exactly 900.0 s on a fresh clone
    (2026-11-27). Slices bound such a miss to ``slice_s``."""
    async def get_msg_in_slices(self, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = slice_s if deadline is None else min(slice_s, max(0.0, deadline - time.monotonic()))
            try:
                return await get_msg(self, timeout=left)
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    get_msg_in_slices.sliced = True
    return get_msg_in_slices


def execute_in_child(job: dict) -> int:
    """Execute one notebook with papermill, the kernel client's sockets polled in slices
    (``poll_in_slices``); the notebook's folder goes to the kernel through nbclient's resources.
    Returns the exit status: 0, or ``TIMED_OUT`` when a cell passed ``job["cell_timeout"]``."""
    from jupyter_client.channels import AsyncZMQSocketChannel
    from nbclient.exceptions import CellTimeoutError
    if not getattr(AsyncZMQSocketChannel.get_msg, "sliced", False):
        AsyncZMQSocketChannel.get_msg = poll_in_slices(AsyncZMQSocketChannel.get_msg)
    try:
        papermill.execute_notebook(job["input"], job["output"], parameters=job["parameters"],
                                   kernel_name="python3", resources={"metadata": {"path": job["folder"]}},
                                   progress_bar=False, execution_timeout=job["cell_timeout"])
    except CellTimeoutError as error:
        print(f"cell time limit: {error}", file=sys.stderr)
        return TIMED_OUT
    return 0


def run(path: Path, parameters: dict, out_dir: Path, cell_timeout: float = CELL_TIMEOUT_S) -> float:
    """Execute one notebook in its own process; its kernel starts in the notebook's folder (its
    relative paths, such as ``../data/stories``, resolve there). A notebook whose cell passes
    ``cell_timeout`` seconds runs once more, in a new kernel.

    Each notebook gets a process of its own because the runner's threads, sharing one process, got
    in each other's way on a fresh clone: papermill moves the process's working directory for a
    moment on every notebook read and write (notebooks 04 and 05 once started in the repository
    root: "no such story file"). A cell that still hangs gets one more kernel: notebook 01's widget
    cell waited out the whole limit three times on fresh clones, for a reply the kernel had sent at
    once (``poll_in_slices`` explains it and bounds that wait to a second now).

    Raises:
        RunnerError: when the notebook fails, or times out twice (papermill's traceback is above it).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    job = {"input": str(path), "output": str(out_dir / path.name), "parameters": parameters,
           "folder": str(path.parent), "cell_timeout": cell_timeout}
    for attempt in (1, 2):
        status = subprocess.run([sys.executable, "-c", _EXECUTE, json.dumps(job), str(Path(__file__).parent)]).returncode
        if status != TIMED_OUT:
            break
        print(f"  {path.stem}: a cell ran past {cell_timeout:.0f} s (attempt {attempt} of 2)", flush=True)
    if status:
        reason = f"a cell ran past {cell_timeout:.0f} s twice" if status == TIMED_OUT else \
            f"papermill exit status {status}, its traceback above"
        raise RunnerError(f"{path.name} failed ({reason}); the partly executed copy is {out_dir / path.name}")
    return time.time() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="notebook names or prefixes (default: all)")
    parser.add_argument("--quick", action="store_true", help="fast parameters, as in the tests")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "notebooks")
    parser.add_argument("--jobs", type=int, default=(os.cpu_count() or 1) + 1,
                        help="notebooks run at once, each kernel on one torch thread when more than one "
                             "(default: one more than the cores, 3 on 2 cores; 1: in reading order)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OSA_CLAIMS_DIR", str(args.out))  # each notebook's key numbers, beside it
    os.environ.setdefault("OSA_CACHE_DIR", str(ROOT / "build" / "cache"))  # story metrics 04 and 05 share
    try:
        runs = plan(args.names, args.p, args.quick)
    except RunnerError as error:
        sys.exit(f"run_notebooks: {error}")
    for path, parameters in runs:
        missing = sorted({n for n, _ in args.p} - set(parameters))
        if missing:
            print(f"note: {path.stem} declares no {missing}; it runs without them", flush=True)
    started = time.time()
    try:
        times = run_all(runs, args.out, max(1, args.jobs))
    except RunnerError as error:
        sys.exit(f"run_notebooks: {error}")
    print(timing_table({p.stem: times[p.stem] for p, _ in runs}, wall=time.time() - started), flush=True)


START_ORDER = ("05", "04", "03", "01", "06", "02")  # longest first: the short ones fill in beside them


def run_all(runs: list[tuple[Path, dict]], out_dir: Path, jobs: int) -> dict[str, float]:
    """Run the notebooks, ``jobs`` at a time, and return each one's seconds.

    The toy model is small, so a second torch thread barely shortens a U-Net call; kernels on one
    thread each use the cores fully. One kernel more than there are cores keeps both cores busy
    while the longest notebooks finish (on 2 cores: 8.4 min with 3 kernels against 9.3 min with 2,
    although 04 and 05 then measure some stories twice). The notebooks start in ``START_ORDER``,
    longest first, so the longest (05) is never the last to start; 04 and 05 share the story metrics
    either has measured (``StoryScorer``'s disk cache, ``$OSA_CACHE_DIR``)."""
    def one(path: Path, parameters: dict) -> float:
        print(f"running {path.name} with {parameters} ...", flush=True)
        seconds = run(path, parameters, out_dir)
        print(f"  {path.stem} done in {seconds:.0f} s -> {out_dir / path.name}", flush=True)
        return seconds

    if jobs == 1 or len(runs) == 1:
        return {path.stem: one(path, parameters) for path, parameters in runs}
    from concurrent.futures import ThreadPoolExecutor  # threads only wait on each notebook's process
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # read by each kernel's torch at start
    with ThreadPoolExecutor(jobs) as pool:
        rank = {prefix: i for i, prefix in enumerate(START_ORDER)}
        ordered = sorted(runs, key=lambda run: rank.get(run[0].stem[:2], len(rank)))
        futures = {path.stem: pool.submit(one, path, parameters) for path, parameters in ordered}
        return {stem: future.result() for stem, future in futures.items()}


def timing_table(times: dict[str, float], wall: float | None = None) -> str:
    """Per-notebook wall-clock seconds, their sum and (notebooks run side by side) the elapsed time,
    as printed at the end of the main job."""
    width = max([len(n) for n in times] + [len("elapsed")])
    lines = ["notebook times:"] + [f"  {n:<{width}}  {s:6.0f} s" for n, s in times.items()]
    total = sum(times.values())
    lines.append(f"  {'total':<{width}}  {total:6.0f} s ({total / 60:.1f} min)")
    if wall is not None:
        lines.append(f"  {'elapsed':<{width}}  {wall:6.0f} s ({wall / 60:.1f} min)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
