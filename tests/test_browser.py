"""Notebook 04's live controls as a reader meets them: JupyterLab on localhost, Debian's Chromium
driven by Playwright, the notebook run with its quick parameters, the λ slider moved, and the
story strip's image must change. Skipped only where Chromium is not installed
(``apt-get install -y chromium``; ``.ci/run`` installs it and Playwright's Python client)."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "04_story_generation.ipynb"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
RUN_SECONDS = 900  # the quick notebook on a busy 2-core machine

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                                         "(apt-get install -y chromium); the browser test needs it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepared_notebook(folder: Path) -> Path:
    """Notebook 04 with its quick parameters injected (as papermill would), paths made absolute."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook
    nb = load_notebook_node(str(NOTEBOOK))  # as papermill reads it (every cell gets its tags list)
    stories = ROOT / "data" / "stories"
    nb = parameterize_notebook(nb, {"quick": True, "story_file": str(stories / "toy_uncoloured_pair.yaml"),
                                    "attribute_story_file": str(stories / "toy_two_contrasting.yaml")})
    path = folder / NOTEBOOK.name
    nbformat.write(nb, path)
    return path


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on localhost serving ``tmp_path``; yields (url, token)."""
    port, token = free_port(), "osa-browser-test"
    env = {**os.environ, "OSA_FIGURES_DIR": str(tmp_path / "figures"), "OSA_CLAIMS_DIR": str(tmp_path),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    server = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
                               "--ip=127.0.0.1", "--allow-root", f"--ServerApp.token={token}", f"--ServerApp.root_dir={tmp_path}",
                               "--ServerApp.disable_check_xsrf=False", "--LabApp.news_url=None",
                               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            if server.poll() is not None:
                break
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail(f"JupyterLab did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
        yield url, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_lambda_slider_redraws_the_story_strip(jupyterlab, tmp_path):
    from playwright.sync_api import sync_playwright  # pip install playwright (no browser download needed)
    url, token = jupyterlab
    notebook = prepared_notebook(tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/lab/tree/{notebook.name}?token={token}")
        page.locator(".jp-NotebookPanel").wait_for(timeout=120_000)
        page.locator(".jp-StatusBar-TextItem", has_text="Idle").first.wait_for(timeout=180_000)  # the kernel is up
        page.locator(".jp-Cell").first.click()  # the notebook has the focus, so the Run menu acts on it
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        page.locator(".jp-InputPrompt", has_text="*").first.wait_for(timeout=60_000)  # the cells are running
        slider = page.locator(".widget-slider", has_text="λ (merge)")
        slider.wait_for(timeout=RUN_SECONDS * 1000)
        # the kernel handles a control's change after the cells queued before it: wait for them
        page.wait_for_function("() => ![...document.querySelectorAll('.jp-InputPrompt')].some(e => e.textContent.includes('*'))",
                               timeout=RUN_SECONDS * 1000)
        # the strip is the last image of the controls' cell; a redraw replaces the <img> element
        last_src = """() => {
            const cell = [...document.querySelectorAll('.jp-CodeCell')].find(c => c.textContent.includes('λ (merge)'));
            const images = cell ? cell.querySelectorAll('.jp-OutputArea-output img') : [];
            return images.length ? images[images.length - 1].getAttribute('src') : null; }"""
        before = page.evaluate(last_src)
        assert before and before.startswith("data:image/png"), "the strip's first state is an image"
        readout = slider.locator(".widget-readout")
        readout.click()
        page.keyboard.press("Control+A")
        page.keyboard.type("0.3")
        page.keyboard.press("Enter")
        try:
            page.wait_for_function(f"(before) => ({last_src})() !== before", arg=before, timeout=300_000)
        except Exception:
            page.screenshot(path=str(tmp_path / "after_slider.png"), full_page=True)
            raise AssertionError(f"the strip did not change after λ was set (readout reads {readout.inner_text()!r}; "
                                 f"screenshot {tmp_path / 'after_slider.png'})")
        after = page.evaluate(last_src)
        browser.close()
    assert after.startswith("data:image/png") and after != before, "moving λ redrew the strip"
