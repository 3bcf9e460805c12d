"""`python -m bernini doctor`: what this machine can run, checked without loading models or downloading."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import sys
from collections.abc import Iterator, Sequence
from fractions import Fraction
from importlib import metadata, util
from typing import Any

import torch

from bernini import __version__, supported

KERNEL_PACKAGES = ("flash-attn", "flash-attn-3", "flash_attn_3", "flash-attn-cute", "flash-attn-4")  # optional, never required
PACKAGES = (
    "torch", "diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub", "tokenizers", "av",
    "numpy", "pillow", "ftfy", "openai", "gradio", "tqdm", "psutil", *KERNEL_PACKAGES,
)
ATTENTION_MODULES = {"fa2": "flash_attn", "fa3": "flash_attn_interface", "fa4": "flash_attn.cute"}


@contextlib.contextmanager
def offline_hub() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the block: hub ids resolve from the local cache or fail, never download."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def check_python() -> dict[str, Any]:
    return {"version": platform.python_version(), "executable": sys.executable, "platform": platform.platform(), "bernini": __version__}


def check_torch() -> dict[str, Any]:
    return {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }


def check_gpus() -> list[dict[str, Any]]:
    """Name, compute capability, total and free memory of every visible GPU."""
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        try:
            free, total = torch.cuda.mem_get_info(i)
        except RuntimeError:
            free, total = None, props.total_memory
        gpus.append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}", "total_gb": round(total / 1e9, 1),
                     "free_gb": None if free is None else round(free / 1e9, 1)})
    return gpus


def check_attention() -> dict[str, Any]:
    """Each backend: usable or why not, and what --attention auto would pick."""
    from bernini.attention import available_backends

    device = "cuda" if torch.cuda.is_available() else "cpu"
    reasons = available_backends(device)
    auto = next((name for name, why in reasons.items() if why is None), None)
    modules = {name: util.find_spec(module.split(".")[0]) is not None for name, module in ATTENTION_MODULES.items()}
    return {"device": device, "backends": {n: ("usable" if why is None else why) for n, why in reasons.items()}, "auto": auto, "modules_found": modules}


def _encode_probe() -> bytes:
    import av
    import numpy as np

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(8))
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 40, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _decode_probe(data: bytes) -> int:
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        return sum(1 for _ in container.decode(video=0))


def check_codecs() -> dict[str, Any]:
    """Can PyAV encode libx264 (our outputs) and decode h264 (most inputs)? Tried on 3 tiny frames."""
    try:
        import av
    except ImportError as exc:
        return {"av": None, "encode_libx264": f"no: {exc}", "decode_h264": "no: PyAV missing"}
    result: dict[str, Any] = {"av": av.__version__, "ffmpeg": {k: ".".join(map(str, v)) for k, v in av.library_versions.items()}}
    try:
        data = _encode_probe()
        result["encode_libx264"] = "yes"
    except Exception as exc:  # a PyAV build without libx264
        result["encode_libx264"] = f"no: {type(exc).__name__}: {exc}"
        result["decode_h264"] = "yes" if _has_decoder("h264") else "no"
        return result
    try:
        result["decode_h264"] = "yes" if _decode_probe(data) == 3 else "no: wrong frame count"
    except Exception as exc:
        result["decode_h264"] = f"no: {type(exc).__name__}: {exc}"
    return result


def _has_decoder(name: str) -> bool:
    import av

    try:
        av.codec.Codec(name, "r")
        return True
    except Exception:
        return False


def check_packages() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def check_dependencies() -> dict[str, Any]:
    """Each declared dependency against its supported range (pyproject.toml's), with the fix if outside."""
    verdicts = supported.check_installed()
    return {"source": supported.ranges_source(), "all_supported": all(v.ok for v in verdicts), "packages": [dataclasses.asdict(v) | {"line": v.line(), "ok": v.ok} for v in verdicts]}


def check_config(config: str) -> dict[str, Any]:
    """Does --config resolve offline? Where are base and experts, and what will they weigh?"""
    from bernini.offload.sizes import read_sizes
    from bernini.pipeline import EXPERT_FOLDERS, resolve_sources

    try:
        with offline_hub():
            sources = resolve_sources(config)
    except (OSError, ValueError) as exc:
        return {"config": config, "resolves_offline": False, "error": str(exc)}
    experts = {name: str(sources.base / EXPERT_FOLDERS[name]) for name in sources.renderer.experts}
    report: dict[str, Any] = {"config": config, "resolves_offline": True, "config_dir": str(sources.config_dir), "base": str(sources.base), "experts": experts,
                              "missing": [str(sources.base / sub) for sub in ("tokenizer", "text_encoder", "vae", "scheduler") if not (sources.base / sub).is_dir()]}
    try:
        sizes = read_sizes(sources.base, len(sources.renderer.experts))
        report["sizes_gb_bf16"] = {"expert": round(sizes.expert_params * 2 / 1e9, 1), "text_encoder": round(sizes.text_encoder_params * 2 / 1e9, 1), "vae": round(sizes.vae_bytes / 1e9, 2)}
    except (OSError, ValueError, KeyError) as exc:
        report["sizes_error"] = str(exc)
    return report


def collect_report(config: str | None) -> dict[str, Any]:
    from bernini.offload.sizes import host_free_bytes

    report = {
        "python": check_python(), "torch": check_torch(), "gpus": check_gpus(), "host_free_gb": None,
        "attention": check_attention(), "codecs": check_codecs(), "packages": check_packages(), "dependencies": check_dependencies(),
    }
    host = host_free_bytes()
    report["host_free_gb"] = None if host is None else round(host / 1e9, 1)
    if config is not None:
        report["config"] = check_config(config)
    return report


def format_report(report: dict[str, Any]) -> str:
    """Plain text, one fact per line."""
    py, th, att, codecs = report["python"], report["torch"], report["attention"], report["codecs"]
    lines = [
        f"bernini {py['bernini']}  python {py['version']}  ({py['platform']})",
        f"torch {th['version']}  CUDA build {th['cuda_build'] or 'none'}  CUDA available: {'yes' if th['cuda_available'] else 'no'}  cuDNN {th['cudnn'] or '-'}",
        f"host memory free: {report['host_free_gb']} GB",
    ]
    lines += [f"GPU {g['index']}: {g['name']} (sm {g['capability']}) {g['free_gb']} GB free of {g['total_gb']} GB" for g in report["gpus"]] or ["GPU: none visible"]
    lines.append(f"attention on {att['device']}: auto -> {att['auto']}")
    lines += [f"  {name:5} {why}" for name, why in att["backends"].items()]
    lines.append(f"video: PyAV {codecs.get('av')}, encode libx264: {codecs.get('encode_libx264')}, decode h264: {codecs.get('decode_h264')}")
    deps = report["dependencies"]
    lines.append(f"dependencies (supported ranges from {deps['source']}):")
    lines += [f"  {entry['line']}" for entry in deps["packages"]]
    outside = [entry["name"] for entry in deps["packages"] if not entry["ok"]]
    lines.append(f"  -> {len(outside)} outside the supported range: {', '.join(outside)}" if outside else "  -> all within the supported ranges")
    lines.append("attention kernel packages (optional):")
    lines += [f"  {name:16} {report['packages'][name] or 'not installed'}" for name in KERNEL_PACKAGES]
    cfg = report.get("config")
    if cfg:
        if cfg["resolves_offline"]:
            lines.append(f"config {cfg['config']}: resolves offline -> base {cfg['base']}")
            lines += [f"  expert {k}: {v}" for k, v in cfg["experts"].items()]
            lines += [f"  MISSING {m}" for m in cfg["missing"]]
            if "sizes_gb_bf16" in cfg:
                s = cfg["sizes_gb_bf16"]
                lines.append(f"  bf16 sizes: expert {s['expert']} GB each, text encoder {s['text_encoder']} GB, VAE {s['vae']} GB")
        else:
            lines.append(f"config {cfg['config']}: does NOT resolve offline:")
            lines += [f"  {line}" for line in cfg["error"].splitlines()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bernini doctor", description="Report what this machine can run (no model loads, no downloads).")
    parser.add_argument("--config", help="config folder, Bernini-R-Diffusers folder or hub id to check (offline)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    report = collect_report(args.config)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0
