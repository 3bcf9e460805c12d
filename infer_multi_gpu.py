"""Render Bernini-R cases on several GPUs: torchrun --nproc-per-node N infer_multi_gpu.py --case CASE [flags]."""

import sys

from bernini.parallel.runner import main

if __name__ == "__main__":
    sys.exit(main(prog="infer_multi_gpu.py"))
