"""The package as pip sees it: one dependency list (pyproject.toml) that requirements.txt repeats, and a wheel with the `bernini` command."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from bernini import supported
from bernini.__main__ import main as bernini_main

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
IN_REQUIREMENTS_TXT = ("demo", "server", "dev")  # extras requirements.txt carries; `fast` needs a CUDA build


def requirement_lines(path: Path) -> list[str]:
    """The requirement of each non-comment line of a requirements file."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def normalized(texts: list[str]) -> list[str]:
    return sorted(str(Requirement(text)) for text in texts)


def test_requirements_txt_repeats_pyproject_exactly() -> None:
    declared = PROJECT["dependencies"] + [text for extra in IN_REQUIREMENTS_TXT for text in PROJECT["optional-dependencies"][extra]]
    assert normalized(requirement_lines(REPO / "requirements.txt")) == normalized(declared)
    assert set(PROJECT["optional-dependencies"]) == {"fast", "demo", "server", "dev"}


def test_the_official_pins_are_inside_the_supported_range() -> None:
    # Users migrating from the official toolkit keep its environment (its requirements.txt pins).
    official = {"torch": "2.5.1", "diffusers": "0.35.2", "transformers": "4.57.3", "accelerate": "0.34.2"}
    ranges = {entry.name: entry.requirement.specifier for entry in supported.supported_ranges()}
    for name, version in official.items():
        assert ranges[name].contains(Version(version)), (name, version, ranges[name])


def test_python_module_and_console_script_are_one_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    module, _, attr = PROJECT["scripts"]["bernini"].partition(":")
    entry = getattr(importlib.import_module(module), attr)
    assert entry is bernini_main  # `bernini ...` runs what `python -m bernini ...` runs
    assert entry(["--help"]) == 0 and "doctor" in capsys.readouterr().out


def setuptools_version() -> Version:
    try:
        return Version(importlib.metadata.version("setuptools"))
    except importlib.metadata.PackageNotFoundError:
        return Version("0")


def build_wheel(tmp_path: Path) -> Path:
    """`pip wheel --no-deps .` from a copy of what the wheel needs (a build never writes into the checkout)."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "bernini", source / "bernini", ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-q", "-w", str(tmp_path / "dist"), str(source)]
    if setuptools_version() >= Version("77"):  # pyproject's `license = "Apache-2.0"` (PEP 639) needs 77
        command.insert(4, "--no-build-isolation")  # build with the installed setuptools: no download needed
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("bernini-*.whl")
    return wheel


def ranges(entries: list[supported.Supported]) -> list[tuple[str, str, str]]:
    return sorted((entry.name, entry.extra or "", str(entry.requirement.specifier)) for entry in entries)


def test_pip_builds_a_wheel_with_the_bernini_command(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = archive.read(info).decode()
        meta = Parser().parsestr(archive.read(info.replace("entry_points.txt", "METADATA")).decode())
    assert "[console_scripts]" in entry_points and "bernini = bernini.__main__:main" in entry_points
    assert "bernini/media/container.py" in names and "bernini/testing.py" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    assert meta["Version"] == importlib.import_module("bernini").__version__
    # The installed package's metadata carries the same ranges the doctor reads from pyproject.toml.
    from_wheel = [supported.from_metadata(Requirement(text)) for text in meta.get_all("Requires-Dist")]
    assert ranges(from_wheel) == ranges(supported.supported_ranges()) and len(from_wheel) > 20


def test_the_benchmarks_run_as_the_readme_writes_them() -> None:
    # `python benchmarks/bench_x.py ...` from the repository root, nothing put on PYTHONPATH by hand.
    kept = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry and Path(entry).resolve() != REPO]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(kept)}  # other entries (a --target site) may hold the dependencies
    # A benchmark of an optional component needs that component's extra (the server's: fastapi).
    needs = {"bench_server.py": "fastapi"}
    for script in sorted((REPO / "benchmarks").glob("[bp]*.py")):
        if script.name in needs and importlib.util.find_spec(needs[script.name]) is None:
            continue
        proc = subprocess.run([sys.executable, f"benchmarks/{script.name}", "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (script.name, proc.stderr[-2000:])
