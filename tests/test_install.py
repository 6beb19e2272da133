"""A non-editable install works away from the clone: the wheel carries the shipped models
(``data/toy_model``, ``data/toy_finetune(_neutral)``, ``data/sdxl_random`` as ``osa_lib/_data``, ``setup.py``)
and ``load_backbone("toy")`` loads them from the installed copy."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("toy_model", "toy_finetune", "toy_finetune_neutral", "sdxl_random")


def _build_wheel(tmp_path: Path) -> Path:
    """``pip wheel --no-deps --no-build-isolation`` (offline) on a copy of what the build reads."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "osa_lib", source / "osa_lib", ignore=shutil.ignore_patterns("__pycache__", "_data"))
    for name in SHIPPED:
        shutil.copytree(ROOT / "data" / name, source / "data" / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    return next((tmp_path / "dist").glob("osa_lab-*.whl"))


def test_wheel_carries_the_models_and_load_backbone_toy_reads_them_from_the_installed_copy(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for name in SHIPPED:
            for path in (ROOT / "data" / name).rglob("*"):
                if path.is_file():
                    assert f"osa_lib/_data/{name}/{path.relative_to(ROOT / 'data' / name).as_posix()}" in names
        site = tmp_path / "site"
        archive.extractall(site)  # a pure-Python wheel installs by unpacking
    code = ("import osa_lib, osa_lib.shipped as s, osa_lib.toy.model as m; from osa_lib import load_backbone; "
            "load_backbone('toy', device='cpu'); load_backbone('toy', variant='neutral', device='cpu'); "
            "print(osa_lib.__file__); print(s.DATA_DIR); print(m.DEFAULT_MODEL_DIR)")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-2000:]
    module, data_dir, model_dir = run.stdout.split()[-3:]
    assert Path(module).is_relative_to(site)  # the installed copy, not the clone
    assert Path(data_dir) == site / "osa_lib" / "_data"
    assert Path(model_dir).is_relative_to(site)
