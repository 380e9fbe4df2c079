"""The README and the changelog render as PyPI renders them; CI runs the README."""

import io
from pathlib import Path

import pytest
from readme_renderer.rst import render

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["README.rst", "CHANGELOG.rst"])
def test_document_renders_without_warnings_on_pypi(name):
    warnings = io.StringIO()
    html = render((ROOT / name).read_text(), stream=warnings)
    assert html is not None, warnings.getvalue()
    assert warnings.getvalue() == ""


def test_ci_runs_the_test_command_the_readme_gives():
    command = "python3 dev.py test"
    assert f"    {command}\n" in (ROOT / "README.rst").read_text()
    assert f"exec {command}\n" in (ROOT / ".ci" / "run").read_text()


def test_changelog_has_an_unreleased_section():
    assert "Unreleased" in (ROOT / "CHANGELOG.rst").read_text().split("\n\n")[1]
