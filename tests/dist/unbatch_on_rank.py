"""Run the multi-GPU main with one rank's memory plan running the guidance passes one at a time (test helper).

Usage: unbatch_on_rank.py RANK OUT_DIR -- <infer_multi_gpu.py flags>
Every rank writes OUT_DIR/batch_<rank>: the batching it rendered with.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from bernini import offload
from bernini.parallel import runner, world


def install(rank: int, out: Path) -> None:
    me = int(os.environ.get("RANK", "0"))
    plan_for_run, load_member = offload.plan_for_run, world.load_member

    def unbatched_here(*args, **kwargs):
        plan = plan_for_run(*args, **kwargs)
        return dataclasses.replace(plan, batch_passes=False) if me == rank else plan

    def recorded(*args, **kwargs):
        renderer, failure = load_member(*args, **kwargs)
        (out / f"batch_{me}").write_text(str(None if renderer is None else renderer.runtime.batch_passes))
        return renderer, failure

    offload.plan_for_run, world.load_member = unbatched_here, recorded


if __name__ == "__main__":
    install(int(sys.argv[1]), Path(sys.argv[2]))
    sys.exit(runner.main(sys.argv[4:]))
