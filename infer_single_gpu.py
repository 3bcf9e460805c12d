"""Render Bernini-R cases on one GPU (or the CPU): python infer_single_gpu.py --case CASE [flags]."""

import sys

from bernini.main import main

if __name__ == "__main__":
    sys.exit(main(prog="infer_single_gpu.py"))
