"""The mutation check's list stays honest: every planted bug still applies to the current source.

The check itself (``python scripts/mutation_check.py``, a few minutes) is not run here; this only
verifies that each mutation's snippet occurs exactly once in its file, so a refactor that moves
code makes this test fail instead of silently turning mutations into no-ops.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_mutation_snippet_matches_its_file_once(load_script):
    script = load_script("mutation_check")
    assert script.snippet_problems() == []


def test_mutation_list_covers_the_issue_and_its_test_files_exist(load_script):
    script = load_script("mutation_check")
    descriptions = [m.description for m in script.MUTATIONS]
    assert len(set(descriptions)) == len(descriptions), "descriptions name the mutations in the table"
    for kind in ("β ignored", "β and 1 − β swapped", "blend removed", "cross-attention merge ignores λ",
                 "first character's ID prompt", "bank read at the previous step", "first stored step",
                 "warm-up ignored"):
        assert any(kind in d for d in descriptions), kind
    for module in ("attention", "baselines", "masks", "sdxl_metrics"):
        assert any(m.file == f"osa_lib/{module}.py" for m in script.MUTATIONS), module
    assert all((ROOT / f).is_file() for f in script.FAST_TESTS + list(script.FIRST.values()))
