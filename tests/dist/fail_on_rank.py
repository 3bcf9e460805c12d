"""Run the multi-GPU main with Renderer.encode_conditions raising on one rank for one case (test helper).

Usage: fail_on_rank.py RANK CASE_NAME EXIT_DIR -- <infer_multi_gpu.py flags>
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bernini.parallel.runner import main
from bernini.pipeline import Renderer


def install_failure(rank: int, case_name: str) -> None:
    original = Renderer.encode_conditions

    def encode_conditions(self, case, settings):
        if int(os.environ.get("RANK", "0")) == rank and case.name == case_name:
            raise RuntimeError(f"injected failure on rank {rank}")
        return original(self, case, settings)

    Renderer.encode_conditions = encode_conditions


if __name__ == "__main__":
    rank, case_name, exit_dir = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    install_failure(rank, case_name)
    code = main(sys.argv[5:])
    (exit_dir / f"exit_{os.environ.get('RANK', '0')}").write_text(str(code))
    sys.exit(code)
