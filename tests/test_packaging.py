"""What the built package holds: pyproject's package data covers every file the
app needs besides its Python modules (a wheel without a template or the browser
client would fail only once installed)."""

import tomllib
from fnmatch import fnmatch
from pathlib import Path

from tests.helpers import sqlite_pass_only

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "channels_presence"


@sqlite_pass_only
def test_every_file_of_the_app_besides_python_is_package_data():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["channels_presence"]
    files = [
        path.relative_to(APP).as_posix()
        for path in APP.rglob("*")
        if path.is_file()
        and path.suffix not in {".py", ".pyc"}
        and "__pycache__" not in path.parts
    ]
    assert "templates/admin/channels_presence/presence_schedule.html" in files
    for name in files:
        assert any(fnmatch(name, pattern) for pattern in globs), name
