"""The wheel carries the shipped models: ``pip install .`` copies data/toy_model, data/toy_finetune, data/toy_finetune_neutral
and data/sdxl_random into the package as osa_lib/_data (osa_lib.shipped finds them there). An
editable install reads data/ in the clone instead. Everything else is in pyproject.toml."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("toy_model", "toy_finetune", "toy_finetune_neutral", "sdxl_random")


class BuildWithShippedData(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # the clone's data/ is read in place
        for name in SHIPPED:
            target = Path(self.build_lib) / "osa_lib" / "_data" / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(Path(__file__).resolve().parent / "data" / name, target,
                            ignore=shutil.ignore_patterns("*.tmp", "*.old", "__pycache__"))


setup(cmdclass={"build_py": BuildWithShippedData})
