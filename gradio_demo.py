"""Bernini-R in the browser: python gradio_demo.py [--config ...] (torchrun --nproc-per-node N ... --ulysses N for several GPUs)."""

import sys

from bernini.demo import main

if __name__ == "__main__":
    sys.exit(main(prog="gradio_demo.py"))
