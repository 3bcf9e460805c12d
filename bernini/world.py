"""The processes of one run as the batch driver sees them: the World interface, and the world of one process."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from bernini.cases import Case
from bernini.config import GenerationSettings, RuntimeConfig
from bernini.offload.sizes import workload_of
from bernini.plan import CasePlan
from bernini.runner import CaseRecord

if TYPE_CHECKING:
    from bernini.engine import Engine
    from bernini.pipeline import ModelSources

log = logging.getLogger(__name__)

T = TypeVar("T")
Planned = list[tuple[Case, CasePlan]]
Part = tuple[dict[int, CaseRecord], float | None, int | None]  # a group's records by todo index, its load seconds, the signal that stopped it


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class LoadFailure(RuntimeError):
    """The models could not be loaded (on this rank or a peer); the message says where and why."""


class World(Protocol):
    """The processes of one run and the collectives the driver needs (each rank of a model group calls them alike)."""

    @property
    def rank(self) -> int:
        """0 plans the batch, writes summary.json and reports."""

    @property
    def size(self) -> int: ...

    @property
    def group(self) -> int:
        """This rank's model group: the index of its share of the batch."""

    @property
    def writes(self) -> bool:
        """This rank decodes, writes outputs and reports its group's records (its group's leader)."""

    def broadcast(self, value: T | None) -> T:
        """Rank 0's value, on every rank."""

    def assign(self, plans: Sequence[CasePlan]) -> list[list[int]]:
        """Rank 0: the case indices each model group renders."""

    def agree(self, value: T | None) -> T | None:
        """The first value of this model group's ranks that is not None, on each of them."""

    def from_leader(self, compute: Callable[[], T]) -> T:
        """The group leader computes, the group hears the value (or the exception, raised on every rank)."""

    def stop_all(self) -> None:
        """--fail-fast: ask every model group to stop before its next case."""

    def stopped(self) -> bool:
        """Whether another model group asked to stop."""

    def load(self, sources: ModelSources, runtime: RuntimeConfig, settings: GenerationSettings, identity: dict[str, Any], plans: Sequence[CasePlan]) -> Engine:
        """This rank's engine for its share of the batch; LoadFailure (on every rank of the group) when it cannot load."""

    def gather(self, part: Part) -> list[Part] | None:
        """Every rank's part on rank 0 (None elsewhere)."""

    def run_info(self) -> dict[str, Any]:
        """What summary.json records of the world."""

    def describe_shares(self, planned: Planned) -> str | None:
        """The --dry-run lines saying which model group renders which cases."""


class LocalWorld:
    """One process: every collective is the identity."""

    rank = 0
    size = 1
    group = 0
    writes = True

    def broadcast(self, value: T | None) -> T:
        return value  # type: ignore[return-value]

    def assign(self, plans: Sequence[CasePlan]) -> list[list[int]]:
        return [list(range(len(plans)))]

    def agree(self, value: T | None) -> T | None:
        return value

    def from_leader(self, compute: Callable[[], T]) -> T:
        return compute()

    def stop_all(self) -> None:
        pass

    def stopped(self) -> bool:
        return False

    def load(self, sources: ModelSources, runtime: RuntimeConfig, settings: GenerationSettings, identity: dict[str, Any], plans: Sequence[CasePlan]) -> Engine:
        from bernini.engine import Engine

        try:
            workload = workload_of(plans, runtime.batch_passes) if plans else None
            return Engine.from_sources(sources, runtime=runtime, settings=settings, workload=workload, identity=identity)
        except Exception as exc:
            log.error("the models could not be loaded: %s", describe(exc), exc_info=not isinstance(exc, ValueError))
            raise LoadFailure(describe(exc)) from exc

    def gather(self, part: Part) -> list[Part] | None:
        return [part]

    def run_info(self) -> dict[str, Any]:
        return {}

    def describe_shares(self, planned: Planned) -> str | None:
        return None
