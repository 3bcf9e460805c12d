"""`bernini convert`: write the experts once in the form they run in (FP8 weights with their scales, or bf16), block by block.

A converted expert loads without re-quantizing at every start, and a block plan can read it back from disk one
block at a time (only the expert in use then waits in host memory). The output is an ordinary sharded safetensors
checkpoint with bare model keys (one shard per block), so it is passed like any separate expert checkpoint:
`--high_noise_ckpt DIR --low_noise_ckpt DIR`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bernini import __version__, fp8
from bernini.offload.disk import SCALE_SUFFIX
from bernini.offload.host import module_slots

log = logging.getLogger(__name__)

FOLDERS = {"high": "bernini_renderer_high", "low": "bernini_renderer_low"}  # the separate-checkpoint layout's names
INDEX = "model.safetensors.index.json"
MARKER = "bernini_convert.json"


def holds_fp8(sources: Sequence[Mapping[str, Any]]) -> bool:
    """True when an expert's key maps hold FP8 weights written by `bernini convert --weights fp8`."""
    return any(key.endswith(SCALE_SUFFIX) for source in sources for key in source)


def fp8_shells(model: nn.Module, weights_format: str, device: torch.device) -> None:
    """Give a meta-device model's blocks FP8Linear layers (still empty), so FP8 checkpoints load as stored."""
    if weights_format != "fp8":
        raise ValueError("these experts hold FP8 weights written by `bernini convert --weights fp8`; run with --weights fp8, "
                         "or convert with --weights bf16 (or pass the original checkpoints) for bf16")
    use_scaled_mm = fp8.scaled_mm_supported(device)
    for block in model.blocks:
        for name, linear in [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]:
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            weight = torch.empty(linear.weight.shape, dtype=fp8.FP8, device="meta")
            scale = torch.empty(linear.out_features, dtype=torch.float32, device="meta")
            bias = None if linear.bias is None else torch.empty(linear.out_features, device="meta")
            setattr(parent, attr, fp8.FP8Linear(weight, scale, bias, use_scaled_mm))


def _forget(module: nn.Module) -> None:
    """Free a written block: its tensors become meta placeholders."""
    for slot in module_slots(module):
        tensor = slot.get()
        placeholder = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        if slot.is_parameter:
            slot.owner._parameters[slot.name] = nn.Parameter(placeholder, requires_grad=False)
        else:
            slot.owner._buffers[slot.name] = placeholder


@dataclass
class ExpertWriter:
    """One expert as a sharded safetensors checkpoint: a shard per block, one for the rest, the index, the config."""

    folder: Path
    layers: int
    metadata: dict[str, str]
    weight_map: dict[str, str] | None = None
    total: int = 0

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.weight_map = {}

    def _write(self, tensors: dict[str, torch.Tensor], shard: int) -> None:
        from safetensors.torch import save_file

        name = f"model-{shard + 1:05d}-of-{self.layers + 1:05d}.safetensors"
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(cpu, str(self.folder / name), metadata={"format": "pt", **self.metadata})
        self.weight_map.update({k: name for k in cpu})  # type: ignore[union-attr]
        self.total += sum(t.numel() * t.element_size() for t in cpu.values())

    def block(self, index: int, block: nn.Module) -> None:
        self._write({f"blocks.{index}.{k}": v for k, v in block.state_dict().items()}, index)

    def rest(self, model: nn.Module) -> None:
        self._write({k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")}, self.layers)

    def finish(self, config: Mapping[str, Any], identity: Mapping[str, Any]) -> None:
        (self.folder / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total}, "weight_map": self.weight_map}, indent=1) + "\n")
        (self.folder / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n")
        (self.folder / MARKER).write_text(json.dumps({"bernini": __version__, **self.metadata, "source": dict(identity)}, indent=2, default=str) + "\n")


def write_expert(model: nn.Module, folder: Path, weights_format: str, config: Mapping[str, Any], identity: Mapping[str, Any]) -> int:
    """Convert an expert held in memory (in place) and write it block by block; bytes written."""
    writer = ExpertWriter(folder, len(model.blocks), {"weights": weights_format})
    for index, block in enumerate(model.blocks):
        if weights_format == "fp8":
            fp8.quantize_linears(block)
        writer.block(index, block)
    writer.rest(model)
    writer.finish(config, identity)
    return writer.total


def convert_expert(sources: Any, name: str, output: Path, weights_format: str, device: torch.device, dtype: torch.dtype) -> int:
    """Read one expert of ``sources`` block by block onto ``device``, convert and write each block; bytes written."""
    from bernini import offload
    from bernini.models.transformer import TransformerConfig, WanTransformer
    from bernini.pipeline import EXPERT_FOLDERS, expert_weight_sources

    config = json.loads((sources.base / EXPERT_FOLDERS[name] / "config.json").read_text())
    with torch.device("meta"):
        model = WanTransformer(TransformerConfig.from_dict(config))
    keys = expert_weight_sources(sources, name)
    if holds_fp8(keys):
        raise ValueError(f"the {name!r} expert is already converted (FP8 weights with scales); pass the original checkpoint")
    writer = ExpertWriter(output / FOLDERS[name], len(model.blocks), {"weights": weights_format})
    use_scaled_mm = weights_format == "fp8" and fp8.scaled_mm_supported(device)
    written = iter(range(len(model.blocks)))

    def each_block(block: nn.Module) -> None:
        if weights_format == "fp8":
            fp8.quantize_linears(block, use_scaled_mm)  # the very function the renderer runs at load: identical bytes
        writer.block(next(written), block)
        _forget(block)

    offload.load_blockwise(model, keys, device=device, dtype=dtype, keep_fp32=WanTransformer.keep_fp32, each_block=each_block)
    writer.rest(model)
    writer.finish(config, sources.identity()["experts"] | {"expert": name})
    return writer.total


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bernini convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/bernini_renderer_wan22", help="config folder, a Bernini-R-Diffusers folder, or a hub id (as for run)")
    p.add_argument("--high_noise_ckpt", help="separate high-noise expert (as for run)")
    p.add_argument("--low_noise_ckpt", help="separate low-noise expert (as for run)")
    p.add_argument("--weights", choices=("fp8", "bf16"), default="fp8", help="fp8: lossy e4m3 block weights with per-row scales, as --weights fp8 makes them")
    p.add_argument("--output", required=True, type=Path, help="folder to write (bernini_renderer_high/ and bernini_renderer_low/ inside)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where each block is converted (default: the GPU if any)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="the dtype the renderer will run in (--dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in --output")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from bernini.cli import configure_logging
    from bernini.pipeline import resolve_sources, torch_dtype

    args = build_parser().parse_args(argv)
    configure_logging("text", False)
    try:
        sources = resolve_sources(args.config, args.high_noise_ckpt, args.low_noise_ckpt)
        folders = [args.output / FOLDERS[name] for name in sources.renderer.experts]
        taken = [f for f in folders if f.exists()]
        if taken and not args.overwrite:
            raise ValueError(f"{taken[0]} exists; pass --overwrite to replace it, or another --output")
        for folder in taken:
            shutil.rmtree(folder)
        device, dtype = torch.device(args.device), torch_dtype(args.dtype)
        for name in sources.renderer.experts:
            start = time.perf_counter()
            nbytes = convert_expert(sources, name, args.output, args.weights, device, dtype)
            log.info("%s expert: %.1f GB of %s weights written to %s in %.1f s", name, nbytes / 1e9, args.weights, args.output / FOLDERS[name], time.perf_counter() - start)
    except ValueError as exc:  # WeightsError included: nothing converted
        log.error("%s", exc)
        return 2
    weights_flag = " --weights fp8" if args.weights == "fp8" else ""
    print(f"converted: run with --high_noise_ckpt {args.output} --low_noise_ckpt {args.output}{weights_flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
