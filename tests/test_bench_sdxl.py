"""scripts/bench_sdxl.py's arithmetic, run on the tiny SDXL in seconds: with ``--repeats`` every
method runs once per round, times are medians over rounds and each ratio to vanilla is the median
of the rounds' paired ratios (so a host whose speed drifts between rounds moves both sides)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_repeats_report_medians_of_paired_ratios(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_sdxl.py"), "--backbone", "sdxl-tiny", "--device", "cpu",
                    "--dtype", "fp32", "--size", "64", "--steps", "2", "--scenes", "3", "--repeats", "3",
                    "--methods", "vanilla,isolated", "--out", str(tmp_path)], check=True, capture_output=True, timeout=300)
    result = json.loads((tmp_path / "bench_sdxl_cpu.json").read_text())["methods"]
    vanilla = np.array(result["vanilla"]["seconds per scene, each round"])
    isolated = np.array(result["isolated"]["seconds per scene, each round"])
    assert len(vanilla) == len(isolated) == 3
    assert result["isolated"]["seconds per scene"] == np.median(isolated)
    assert np.allclose(result["isolated"]["× vanilla, each round"], isolated / vanilla)
    table = (tmp_path / "bench_sdxl_cpu.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| isolated |"))
    assert f"| {np.median(isolated / vanilla):.3f} (returning scenes: " in row, row
    assert "3 rounds in rotating order" in table
    assert "bank on the device (GiB)" in table  # a CPU run keeps every bank on the host: 0 there
    assert result["isolated"]["bank bytes on the device"] == result["vanilla"]["bank bytes on the device"] == 0
