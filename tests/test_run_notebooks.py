"""The notebook runner refuses a bad command line before any notebook runs (issue 15)."""
from pathlib import Path

import pytest


@pytest.fixture
def runner(load_script):
    return load_script("run_notebooks")


@pytest.fixture
def ran(runner, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "run", lambda path, parameters, out: calls.append((path.stem, parameters)) or 0.0)
    return calls


def refused(runner, ran, argv, message):
    with pytest.raises(SystemExit) as info:
        runner.main(argv)
    assert ran == [], "nothing may run when the command line is refused"
    assert message in str(info.value), str(info.value)
    return str(info.value)


def test_an_unknown_notebook_among_known_ones_stops_everything(runner, ran):
    text = refused(runner, ran, ["01", "99_nothing"], "unknown notebook name(s) ['99_nothing']")
    assert "01_cross_attention" in text and "05_open_questions" in text


def test_unknown_and_misspelt_parameters_list_the_accepted_ones_with_types(runner, ran):
    text = refused(runner, ran, ["-p", "bogus", "1"], "unknown parameter(s) ['bogus']")
    assert "num_steps: int = 25" in text and "lams: str" in text
    refused(runner, ran, ["01", "-p", "backbone", "sdxl"], "unknown parameter(s) ['backbone']")  # it is backbone_name


@pytest.mark.parametrize("name, value, message", [
    ("num_steps", "four", "num_steps is declared as int"),
    ("num_steps", "2.5", "give an integer"),
    ("quick", "maybe", "give true or false"),
])
def test_values_that_do_not_parse_as_the_declared_type_are_refused(runner, ran, name, value, message):
    refused(runner, ran, ["01", "-p", name, value], message)


def test_lists_are_passed_the_way_the_notebook_declares_them(runner, ran):
    runner.main(["05", "-p", "lams", "0,1"])
    runner.main(["05", "-p", "lams", "[0, 1.1]"])
    assert [params["lams"] for _, params in ran] == ["0,1", "0,1.1"]  # lams is a comma-separated str


def test_a_parameter_goes_only_to_the_notebooks_that_declare_it(runner, ran):
    runner.main(["01", "03", "-p", "backbone_name", "sdxl-tiny", "-p", "seed", "4"])
    assert sorted(ran) == [("01_cross_attention", {"backbone_name": "sdxl-tiny", "seed": 4}),
                           ("03_cv_overlap", {"seed": 4})]


def test_quick_never_overrides_an_explicit_parameter(runner, ran):
    refused(runner, ran, ["01", "--quick", "-p", "num_steps", "10"], "--quick replaces ['num_steps'] in 01_cross_attention")
    refused(runner, ran, ["05", "--quick", "-p", "lams", "0,1,2"], "--quick replaces ['lams'] in 05_open_questions")
    runner.main(["01", "--quick", "-p", "seed", "4"])  # quick does not touch the seed
    runner.main(["01", "--quick", "-p", "quick", "false"])  # the explicit -p wins
    runner.main(["04", "--quick", "-p", "story_file", "x.yaml"])  # quick draws story_file itself
    assert [params for _, params in ran] == [{"seed": 4, "quick": True}, {"quick": False},
                                             {"story_file": "x.yaml", "quick": True}]


def test_the_main_job_ends_with_per_notebook_times_and_their_total(runner):
    table = runner.timing_table({"01_cross_attention": 40.2, "05_open_questions": 219.6})
    lines = table.splitlines()
    assert lines[0] == "notebook times:"
    assert lines[1].split() == ["01_cross_attention", "40", "s"] and lines[2].split() == ["05_open_questions", "220", "s"]
    assert lines[3].split() == ["total", "260", "s", "(4.3", "min)"]


def test_every_notebook_runs_once_whether_one_or_two_at_a_time(runner, ran, capsys):
    runner.main(["--jobs", "1"])
    in_order = list(ran)
    assert [stem for stem, _ in in_order] == [p.stem for p in runner.notebooks([])]  # reading order
    ran.clear()
    runner.main(["--jobs", "2"])
    assert sorted(ran) == sorted(in_order)
    out = capsys.readouterr().out
    assert out.count("notebook times:") == 2 and "elapsed" in out


def test_a_kernel_starts_in_its_notebooks_folder_whatever_the_shared_working_directory(runner, tmp_path, monkeypatch):
    """``run`` hands each kernel its notebook's folder (relative paths resolve there) instead of
    relying on the runner's working directory, which the threads of ``run_all`` share and papermill
    changes for a moment on every read and write: a fresh-clone run started notebooks 04 and 05 in
    the repository root. Here every move into the notebook's folder is undone at once, as another
    thread can do; the kernel must still start there."""
    import json
    import os
    import nbformat
    folder = tmp_path / "notebooks"
    folder.mkdir()
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("import os\nprint(os.getcwd())")]
    nbformat.write(notebook, folder / "where.ipynb")
    monkeypatch.chdir(tmp_path)
    real_chdir = os.chdir
    monkeypatch.setattr(os, "chdir", lambda path: None if Path(path) == folder else real_chdir(path))
    runner.run(folder / "where.ipynb", {}, tmp_path / "out")
    printed = json.loads((tmp_path / "out" / "where.ipynb").read_text())["cells"][0]["outputs"][0]["text"]
    assert "".join(printed).strip() == str(folder)


def _notebook(folder: Path, name: str, source: str) -> Path:
    import nbformat
    folder.mkdir(parents=True, exist_ok=True)
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source)]
    nbformat.write(notebook, folder / name)
    return folder / name


def test_each_notebook_runs_in_a_process_of_its_own(runner, tmp_path):
    """The kernel's client lives in a child process, not in the runner whose threads share one
    process (and papermill's working-directory moves with it): the kernel's parent is not this process."""
    import json
    import os
    path = _notebook(tmp_path / "notebooks", "parent.ipynb", "import os\nprint(os.getppid())")
    runner.run(path, {}, tmp_path / "out")
    printed = json.loads((tmp_path / "out" / "parent.ipynb").read_text())["cells"][0]["outputs"][0]["text"]
    assert int("".join(printed)) != os.getpid()


def test_a_failing_notebook_stops_the_main_job_naming_it(runner, tmp_path):
    path = _notebook(tmp_path / "notebooks", "broken.ipynb", "raise ValueError('planted')")
    with pytest.raises(runner.RunnerError, match=r"broken.ipynb failed \(papermill exit status 1"):
        runner.run(path, {}, tmp_path / "out")


def test_a_cell_past_its_time_limit_gets_a_second_kernel_then_stops_the_job(runner, tmp_path, capsys):
    path = _notebook(tmp_path / "notebooks", "slow.ipynb", "import time\ntime.sleep(60)")
    with pytest.raises(runner.RunnerError, match=r"slow.ipynb failed \(a cell ran past 2 s twice\)"):
        runner.run(path, {}, tmp_path / "out", cell_timeout=2)
    assert capsys.readouterr().out.count("a cell ran past 2 s") == 2


class _MissedWakeUpChannel:
    """A channel whose poll never wakes for a message, as pyzmq's did for notebook 01's widget cell:
    ``get_msg`` sleeps its whole timeout, then finds the message if it has arrived by then."""

    def __init__(self, arrives_after: float | None):
        import time
        self.arrives_at = None if arrives_after is None else time.monotonic() + arrives_after
        self.calls = 0

    async def get_msg(self, timeout=None):
        import asyncio
        import time
        from queue import Empty
        self.calls += 1
        await asyncio.sleep(3600 if timeout is None else timeout)
        if self.arrives_at is not None and time.monotonic() >= self.arrives_at:
            return {"reply": "sent long ago"}
        raise Empty


def test_a_missed_wake_up_costs_a_slice_not_the_cell_time_limit(runner):
    import asyncio
    import time
    for timeout in (30.0, None):  # the cell's limit, and nbclient's wait for outputs (no limit)
        channel = _MissedWakeUpChannel(arrives_after=0.1)
        get_msg = runner.poll_in_slices(_MissedWakeUpChannel.get_msg, slice_s=0.05)
        started = time.monotonic()
        assert asyncio.run(get_msg(channel, timeout=timeout)) == {"reply": "sent long ago"}
        assert time.monotonic() - started < 1.0 and channel.calls >= 2


def test_slices_still_end_at_the_callers_timeout(runner):
    import asyncio
    import time
    from queue import Empty
    channel = _MissedWakeUpChannel(arrives_after=None)
    get_msg = runner.poll_in_slices(_MissedWakeUpChannel.get_msg, slice_s=0.05)
    started = time.monotonic()
    with pytest.raises(Empty):
        asyncio.run(get_msg(channel, timeout=0.3))
    assert 0.3 <= time.monotonic() - started < 1.0
    with pytest.raises(Empty):
        asyncio.run(get_msg(channel, timeout=0))


def test_the_child_process_polls_the_kernels_sockets_in_slices(runner, tmp_path, monkeypatch):
    """``execute_in_child`` installs ``poll_in_slices`` on jupyter_client's async channel (what
    nbclient's client uses) before papermill starts, once however often it is called."""
    from jupyter_client.channels import AsyncZMQSocketChannel
    monkeypatch.setattr(AsyncZMQSocketChannel, "get_msg", AsyncZMQSocketChannel.get_msg)
    seen = []
    monkeypatch.setattr(runner.papermill, "execute_notebook",
                        lambda *a, **k: seen.append(AsyncZMQSocketChannel.get_msg))
    job = {"input": "in.ipynb", "output": str(tmp_path / "out.ipynb"), "parameters": {},
           "folder": str(tmp_path), "cell_timeout": 5}
    assert runner.execute_in_child(job) == 0 and runner.execute_in_child(job) == 0
    assert all(getattr(get_msg, "sliced", False) for get_msg in seen)
    assert seen[0] is seen[1]  # not wrapped twice
