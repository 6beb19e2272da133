"""The project's shape: dependency pins agree, the README's two commands exist and CI calls one."""
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_pins() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"dependencies = \[(.*?)\]", text, re.S).group(1)
    dev = re.search(r"dev = \[(.*?)\]", text, re.S).group(1)
    return set(re.findall(r'"([^"]+)"', deps + dev))


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d for d in env["dependencies"] if isinstance(d, dict))["pip"]
    conda_pins = {p for p in pip if not p.startswith("-e")}
    assert conda_pins == _pyproject_pins()
    assert all("==" in p for p in conda_pins), "pin every version"


def test_torch_pinned_to_the_cpu_build_version():
    assert "torch==2.13.0" in _pyproject_pins()
    assert 'pip install --quiet "torch==2.13.0"' in (ROOT / "scripts" / "setup_env.sh").read_text()


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/run_notebooks.sh" in readme
    assert "bash scripts/test.sh" in readme
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_required_layout_exists():
    for name in ("notebooks", "osa_lib", "data", "figures", "tests", "environment.yml", "README.md"):
        assert (ROOT / name).exists(), name


NO_PROVENANCE = {"results/bank_options.md"}  # written before results files named their commit; the README says so


def test_readme_is_a_front_page_whose_links_exist():
    """A front page: at most 200 lines; every local file it links (results, figures, model card) is there,
    and every results file it links names the command, commit and machine that wrote it (or, for
    files from before issue 16, a commit in a settings table)."""
    import re
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    links = set(re.findall(r"\]\(((?:results|figures|data)/[^)#]+)\)", readme))
    assert any(link.startswith("results/") for link in links) and "data/toy_model/README.md" in links
    for link in links:
        path = ROOT / link
        if link.startswith("figures/"):
            continue  # written by the main job, not committed
        assert path.is_file(), f"README links {link}, which does not exist"
        if link.endswith(".md") and link.startswith("results/") and link not in NO_PROVENANCE:
            text = path.read_text()
            assert "commit" in text, f"{link} does not say which commit it was measured on"


def test_results_readme_lists_every_results_file_and_its_links_exist():
    """results/README.md is the folder's index: every file in results/ (history/ included) is linked
    from it, every link points at a file, and no current file asks for a run folder a clone lacks."""
    import re
    results = ROOT / "results"
    index = (results / "README.md").read_text()
    files = sorted(p.relative_to(results).as_posix() for p in results.rglob("*")
                   if p.is_file() and p.name != "README.md")
    links = set(re.findall(r"\]\(([^)#]+)\)", index))
    assert [f for f in files if f not in links] == [], "results files missing from results/README.md"
    assert [link for link in links if not (results / link).is_file()] == [], "results/README.md links a missing file"
    current = [f for f in files if not f.startswith("history/")]
    assert [f for f in current if "runs/" in (results / f).read_text()] == [], \
        "a current results file names a runs/ folder, which a clone lacks: move it to history/ or re-run it"
