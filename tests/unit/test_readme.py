"""The README's two commands are what CI and newcomers run."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEST_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"
RUN_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/farmiq-edge up"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"    {TEST_COMMAND}\n" in readme
    assert f"    {RUN_COMMAND}\n" in readme
    assert ci.rstrip().splitlines()[-1] == TEST_COMMAND


def test_procfile_in_readme_matches_the_procfile():
    readme = (ROOT / "README.md").read_text()
    for line in (ROOT / "Procfile").read_text().splitlines():
        assert f"    {line}\n" in readme
