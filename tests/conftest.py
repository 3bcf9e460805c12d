"""Fixtures several test modules share: the tiny checkpoint, one CPU thread, and models loaded once per session.

Modules opt in by name (``pytestmark = pytest.mark.usefixtures(...)``) rather than by autouse, so a module
that needs more threads or real loads is not changed by another's needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from bernini.pipeline import Renderer
from bernini.testing import tiny_checkpoints


@pytest.fixture(scope="session")
def config() -> str:
    """The tiny Bernini-R-Diffusers checkpoint (built once, cached on disk by bernini.testing)."""
    return str(tiny_checkpoints().diffusers)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: extra threads only add contention on a busy test machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_LOADED: dict[Any, Renderer] = {}


@pytest.fixture
def cached_load(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The tiny models load once per module (batch code still calls Renderer.load per run); one entry per call.

    Per module, not per session: a module's first batch really loads, so its load timings are real.
    """
    calls: list[int] = []
    real = Renderer.load.__func__  # type: ignore[attr-defined]

    def load(cls: type[Renderer], sources: Any, runtime: Any = None, workload: Any = None) -> Renderer:
        calls.append(1)
        key = (request.module.__name__, str(sources.base), runtime.device, runtime.dtype, runtime.attention)
        if key not in _LOADED:
            _LOADED[key] = real(cls, sources, runtime)
        return _LOADED[key]

    monkeypatch.setattr(Renderer, "load", classmethod(load))
    return calls
