"""Every notebook: committed without outputs, one parameters cell, a title and a claim, and it
executes under papermill with fast parameters (figures go to a temporary folder)."""
import re
from pathlib import Path

import nbformat
import papermill
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_notebooks_exist_in_reading_order():
    names = [p.stem[:2] for p in NOTEBOOKS]
    assert names == [f"{i:02d}" for i in range(1, len(names) + 1)] and len(names) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_structure(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one papermill parameters cell"
    assert "quick: bool" in tagged[0].source, "a quick switch for the test suite"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert nb.cells[1].cell_type == "markdown" and nb.cells[1].source.startswith("> ")
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, "strip outputs before committing"
    declared = [line.split(":")[0] for line in tagged[0].source.splitlines() if re.match(r"^\w+\s*:", line)]
    assert list(papermill.inspect_notebook(str(path))) == declared, "papermill parses every parameter"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_quickly(path, tmp_path, monkeypatch):
    monkeypatch.setenv("OSA_FIGURES_DIR", str(tmp_path / "figures"))
    papermill.execute_notebook(str(path), str(tmp_path / path.name), parameters={"quick": True},
                               cwd=str(path.parent), kernel_name="python3", progress_bar=False)
    assert list((tmp_path / "figures").glob("*.png")), "the notebook saved its figures"


STORY_NOTEBOOK = ROOT / "notebooks" / "04_story_generation.ipynb"


def test_story_notebook_executes_on_sdxl_tiny(tmp_path, monkeypatch):
    """Notebook 04 on the SDXL code path (tiny random SDXL, `load_backbone("sdxl-tiny")`), fast parameters."""
    monkeypatch.setenv("OSA_FIGURES_DIR", str(tmp_path / "figures"))
    sdxl_story = "../data/stories/sdxl_girl_and_boy.yaml"
    papermill.execute_notebook(str(STORY_NOTEBOOK), str(tmp_path / STORY_NOTEBOOK.name),
                               parameters={"quick": True, "backbone_name": "sdxl-tiny", "story_file": sdxl_story,
                                           "attribute_story_file": sdxl_story},
                               cwd=str(STORY_NOTEBOOK.parent), kernel_name="python3", progress_bar=False)
    assert {p.stem for p in (tmp_path / "figures").glob("*.png")} >= {"04_comic_strip", "04_masks", "04_attribute_test"}
