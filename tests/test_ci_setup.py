""".ci/setup installs only what is missing (so that it runs offline when nothing is)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, ".ci"))
import missing_requirements as mr  # noqa: E402


def test_reads_dependencies_and_extras_from_pyproject(monkeypatch):
    monkeypatch.chdir(ROOT)
    base = mr.requirements([])
    assert any(r.startswith("torch") for r in base) and "numpy" in base
    test = mr.requirements(["test"])
    assert set(base) < set(test) and any(r.startswith("pytest") for r in test)
    if mr.tomllib is not None:  # the 3.10 fallback parser reads the same lists
        monkeypatch.setattr(mr, "tomllib", None)
        assert mr.requirements(["test"]) == test


def test_satisfied_checks_presence_and_minimum_version():
    assert mr.satisfied("pytest") and mr.satisfied("pytest>=1")
    assert not mr.satisfied("pytest>=999")
    assert not mr.satisfied("surely-not-an-installed-distribution-xyz")


def test_prints_nothing_when_everything_is_installed():
    res = subprocess.run([sys.executable, ".ci/missing_requirements.py"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == ""  # torch and numpy are installed here
