"""The supported dependency ranges, read from their one source, and a verdict on each installed version.

The source is pyproject.toml's dependencies and extras: read from the file in a source checkout (the
live truth while it is edited), else from the installed package's metadata, which pip wrote from it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
DISPLAY_NAMES = {"av": "PyAV"}  # what users call a package, where it differs from its PyPI name


@dataclass(frozen=True)
class Supported:
    """One dependency: its requirement, and the extra that brings it (None: always needed)."""

    requirement: Requirement
    extra: str | None = None

    @property
    def name(self) -> str:
        return canonicalize_name(self.requirement.name)


@dataclass(frozen=True)
class Verdict:
    """How an installed package stands against its supported range."""

    name: str
    installed: str | None
    spec: str  # e.g. ">=0.35.2"; "" for any version
    extra: str | None
    status: str  # "supported", "too old", "too new", "unsupported", "missing", "not installed"
    fix: str | None  # the pip command that brings it into range, when it is out of range

    @property
    def ok(self) -> bool:
        """True unless a needed package is missing or installed outside its range."""
        return self.status in ("supported", "not installed")

    def line(self) -> str:
        """"PyAV 19.0.2: supported" / "diffusers 0.34: too old, pip install 'diffusers>=0.35.2'"."""
        label = f"{DISPLAY_NAMES.get(self.name, self.name)} {self.installed or ''}".rstrip()
        if self.status == "not installed":
            return f"{label}: not installed (optional, for {self.extra}: pip install '{requirement_text(self)}')"
        used_by = f" (for {self.extra})" if self.extra else ""
        return f"{label}: {self.status}{used_by}" + (f", {self.fix}" if self.fix else "")


def requirement_text(verdict: Verdict) -> str:
    return f"{verdict.name}{verdict.spec}"


def source_project(pyproject: Path = PYPROJECT) -> dict | None:
    """The [project] table of bernini's own pyproject.toml, when running from a source checkout."""
    if not pyproject.is_file():
        return None
    project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
    return project if project.get("name") == "bernini" else None


def ranges_source() -> str:
    """Where supported_ranges() reads from, for reports."""
    return str(PYPROJECT) if source_project() is not None else "the installed bernini's metadata"


def supported_ranges(pyproject: Path = PYPROJECT) -> list[Supported]:
    """Every dependency and extra bernini declares, from pyproject.toml or else the installed metadata."""
    project = source_project(pyproject)
    if project is not None:
        found = [Supported(Requirement(text)) for text in project.get("dependencies", [])]
        for extra, texts in project.get("optional-dependencies", {}).items():
            found += [Supported(Requirement(text), extra) for text in texts]
        return found
    try:
        texts = metadata.requires("bernini") or []
    except metadata.PackageNotFoundError:
        return []
    return [from_metadata(Requirement(text)) for text in texts]


def from_metadata(requirement: Requirement) -> Supported:
    """Requires-Dist carries an extra as a marker (`; extra == "demo"`): split it off."""
    marker = str(requirement.marker or "")
    extra = marker.split("==")[-1].strip().strip("'\"") if marker.startswith("extra ==") else None
    if extra is not None:
        requirement = Requirement(str(requirement).split(";")[0])
    return Supported(requirement, extra)


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def judge(entry: Supported, installed: str | None) -> Verdict:
    """Place one installed version (None: not installed) against its range, with the fix if outside."""
    spec = str(entry.requirement.specifier)
    want = f"pip install '{entry.name}{spec}'"
    if installed is None:
        status = "missing" if entry.extra is None else "not installed"
        return Verdict(entry.name, None, spec, entry.extra, status, want if entry.extra is None else None)
    try:
        version = Version(installed)
    except InvalidVersion:
        return Verdict(entry.name, installed, spec, entry.extra, "unsupported", f"{want} (unreadable version)")
    if entry.requirement.specifier.contains(version, prereleases=True):
        return Verdict(entry.name, installed, spec, entry.extra, "supported", None)
    below = [s for s in entry.requirement.specifier if s.operator in (">=", ">", "~=", "==", "===")]
    status = "too old" if any(not s.contains(version, prereleases=True) for s in below) else "too new"
    return Verdict(entry.name, installed, spec, entry.extra, status, want)


def check_installed(entries: list[Supported] | None = None) -> list[Verdict]:
    """A verdict for every declared dependency, in declaration order."""
    entries = supported_ranges() if entries is None else entries
    return [judge(entry, installed_version(entry.name)) for entry in entries if entry.requirement.marker is None or entry.requirement.marker.evaluate()]
