"""`python -m bernini doctor | make-tiny DIR | run [flags] | serve [flags] | summary merge DIR... | convert --output DIR`: the toolkit's commands."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: python -m bernini COMMAND [ARGS]

commands:
  doctor [--config X] [--json]   report Python, torch, GPUs, attention backends, codecs, packages, config
  make-tiny DIR [--seed N]       write tiny random-weight checkpoints for tests
  run [FLAGS]                    render cases on one GPU (the flags of infer_single_gpu.py)
  serve [FLAGS]                  the /v1/videos job server (model flags as run; --host, --port, --data_dir)
  summary merge DIR... [-o OUT]  merge the summaries of a batch's shards into one summary.json
  convert --output DIR [FLAGS]   write the experts once as they run (FP8 with scales, or bf16), block by block"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else ""
    if command == "doctor":
        from bernini import doctor

        return doctor.main(args[1:])
    if command == "make-tiny":
        from bernini import testing

        return testing.main(args)
    if command == "convert":
        from bernini import convert

        return convert.main(args[1:])
    if command == "run":
        from bernini.main import main as run

        return run(args[1:], prog="python -m bernini run")
    if command == "serve":
        from bernini.server.launch import main as serve

        return serve(args[1:], prog="python -m bernini serve")
    if command == "summary":
        from bernini import shard

        return shard.main(args[1:])
    print(USAGE, file=sys.stdout if command in ("-h", "--help") else sys.stderr)
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
