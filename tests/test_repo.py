"""Promises about the repository itself: README commands are what CI runs, code is lint-clean."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", quick_start, re.S)]


def test_readme_shows_exactly_two_fresh_machine_commands():
    commands = readme_commands()
    assert len(commands) == 2
    main_job, tests = commands
    assert "subkern bench --quick" in main_job and "pip install" in main_job
    assert "pytest" in tests and "pip install" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci.splitlines()


def test_kernels_install_as_subpackage_not_top_level():
    import subkern.kernels  # noqa: F401

    setup = (ROOT / "setup.py").read_text()
    assert '"subkern.kernels": "kernels"' in setup


def test_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' brings it)")
    out = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_example_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "binary_retrieval.py")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "precision@10" in out.stdout and "reloaded" in out.stdout
