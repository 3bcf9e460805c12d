"""Tiny random-weight Bernini-R / Wan2.2 checkpoints in the exact real on-disk layouts, for tests."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import string
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from tokenizers.pre_tokenizers import PreTokenizer
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Bump when the layout or contents change so stale caches get rebuilt.
TINY_FORMAT_VERSION = 2  # 2: the tokenizer saves its </s> post-processor
MARKER_NAME = ".bernini-tiny-complete"
DIFFUSERS_NAME = "Bernini-R-Diffusers"
WAN_BASE_NAME = "Wan2.2-T2V-A14B-Diffusers"
SEPARATE_NAME = "Bernini-R"
HIGH_NAME = "bernini_renderer_high"
LOW_NAME = "bernini_renderer_low"

# head_dim 24 makes the Wan RoPE split t/h/w = 8/8/8.
TINY_TRANSFORMER_CONFIG: dict[str, object] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 2,
    "attention_head_dim": 24,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}

TINY_TEXT_ENCODER_CONFIG: dict[str, object] = {
    "d_model": 32,
    "num_layers": 2,
    "num_heads": 2,
    "d_kv": 16,
    "d_ff": 64,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    # As umt5-xxl's config says; transformers 5 forces T5 ties on and keeps this as scale_decoder_outputs.
    "tie_word_embeddings": False,
}

TINY_VAE_CONFIG: dict[str, object] = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}

WAN22_SCHEDULER_CONFIG: dict[str, object] = {
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "final_sigmas_type": "zero",
    "timestep_spacing": "linspace",
    "num_train_timesteps": 1000,
}

BERNINI_RENDERER_CONFIG: dict[str, object] = {
    "model_type": "bernini_renderer",
    "architectures": ["BerniniRendererModel"],
    "wan22_base": ".",
    "skip_transformer_1": False,
    "skip_transformer_2": False,
    "switch_dit_boundary": 0.875,
    "max_sequence_length": 512,
    "shift": 3.0,
    "use_unipc": True,
    "use_src_id_rotary_emb": True,
}

WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

TOKENIZER_CORPUS: tuple[str, ...] = (
    "A cat walks on the grass, realistic style.",
    "A red car drives along a winding mountain road at sunset.",
    "Two people talk in a small cafe while rain falls outside the window.",
    "The camera slowly pans across a quiet city street at night.",
    "A dog runs through shallow water on a sunny beach.",
    "Close-up of a woman smiling, soft light, shallow depth of field.",
    "An astronaut rides a horse on the surface of the moon.",
    "Render the scene from a new viewpoint with consistent lighting and geometry.",
    "A bird flies over a green forest; the trees sway in the wind.",
    "Low quality, blurry, static frame, worst quality, bad hands, extra fingers.",
    WAN_NEGATIVE_PROMPT,
    "一只猫在草地上行走，阳光明媚，写实风格。",
    "镜头缓慢移动，城市街道，夜晚，灯光，雨水。",
)

# Seed offsets so each component gets its own independent random stream.
SEED_HIGH = 11
SEED_LOW = 12
SEED_BASE_HIGH = 21
SEED_BASE_LOW = 22
SEED_DECOY_HIGH = 31
SEED_DECOY_LOW = 32
SEED_TEXT_ENCODER = 41
SEED_VAE = 51


@dataclass(frozen=True)
class TinyCheckpoints:
    """Paths of one tiny checkpoint set written by :func:`make_tiny_checkpoints`."""

    root: Path
    diffusers: Path  # Bernini-R-Diffusers (transformer = high, transformer_2 = low)
    wan_base: Path  # Wan2.2-T2V-A14B-Diffusers, other transformer weights
    separate: Path  # Bernini-R with bernini_renderer_high/ and bernini_renderer_low/

    @property
    def separate_high(self) -> Path:
        return self.separate / HIGH_NAME

    @property
    def separate_low(self) -> Path:
        return self.separate / LOW_NAME

    def paths(self) -> tuple[Path, ...]:
        return (self.diffusers, self.wan_base, self.separate)


def layout_for(root: Path) -> TinyCheckpoints:
    """Return the TinyCheckpoints paths under ``root`` (nothing is written)."""
    root = Path(root)
    return TinyCheckpoints(
        root=root,
        diffusers=root / DIFFUSERS_NAME,
        wan_base=root / WAN_BASE_NAME,
        separate=root / SEPARATE_NAME,
    )


def generator_for(seed: int, offset: int) -> torch.Generator:
    """Return a CPU generator for one component; CPU randn is bit-reproducible."""
    return torch.Generator(device="cpu").manual_seed(seed * 1000 + offset)


def randomize_(module: torch.nn.Module, generator: torch.Generator, std: float = 0.1) -> None:
    """Fill every parameter with noise, so outputs depend on all of them (diffusers zero-inits some)."""
    with torch.no_grad():
        for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
            # Norm gains around 1 keep activations at a sane scale through the blocks.
            if "norm" in name and name.endswith(".weight"):
                noise += 1.0
            param.copy_(noise.to(param.dtype))


def write_json(path: Path, data: object) -> None:
    """Write pretty, key-sorted JSON with a trailing newline (byte-stable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_transformer(generator: torch.Generator) -> torch.nn.Module:
    """Build a tiny WanTransformer3DModel with random float32 weights."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    randomize_(model, generator)
    return model.eval()


def save_transformer(model: torch.nn.Module, directory: Path) -> None:
    """Save like the real repos: config.json + sharded safetensors + index json."""
    # Small shards so the tiny model is split over several files, exercising the index path.
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="40KB")


def build_tokenizer_backend() -> Tokenizer:
    """Estimate a small Unigram model from the built-in corpus, shaped the way T5Tokenizer rebuilds it."""
    from tokenizers import Tokenizer, models, processors

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + estimate_unigram_pieces(TOKENIZER_CORPUS)
    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = t5_pre_tokenizer()
    # The real tokenizer.json appends </s> itself; transformers 5 rebuilds this on load, 4.57 keeps what is saved.
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return backend


def estimate_unigram_pieces(corpus: Sequence[str], max_piece_length: int = 4, min_count: int = 2) -> list[tuple[str, float]]:
    """Score pieces by log relative frequency over the pre-tokenized corpus.

    Counting instead of tokenizers' UnigramTrainer: the trainer's parallel float sums and
    hash-ordered tie breaks make its output differ from run to run, and the cache must be
    byte-identical for a given seed.
    """
    pre_tokenizer = t5_pre_tokenizer()
    counts: Counter[str] = Counter()
    for line in corpus:
        for word, _ in pre_tokenizer.pre_tokenize_str(line):
            counts.update(substrings(word, max_piece_length))
            counts[word] += 1
    total = sum(counts.values())
    kept = {piece: count for piece, count in counts.items() if count >= min_count or len(piece) == 1}
    scores = {piece: round(math.log(count / total), 4) for piece, count in kept.items()}
    scored = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
    floor = scored[-1][1] - 1.0
    known = set(kept)
    return scored + [(char, floor) for char in extra_alphabet() if char not in known]


def substrings(word: str, max_length: int) -> Iterator[str]:
    """Yield every substring of ``word`` up to ``max_length`` characters."""
    for start in range(len(word)):
        for end in range(start + 1, min(len(word), start + max_length) + 1):
            yield word[start:end]


def t5_pre_tokenizer() -> PreTokenizer:
    """The pre-tokenizer T5Tokenizer installs on reload, so training and use agree."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )


def extra_alphabet() -> list[str]:
    """Characters to cover beyond the corpus, so common text never falls back to <unk>."""
    ascii_chars = set(string.ascii_letters + string.digits + string.punctuation)
    return sorted(ascii_chars | set("，。！？、；：“”‘’（）《》"))


def build_tokenizer() -> PreTrainedTokenizerBase:
    """Wrap the corpus-estimated backend as a T5 tokenizer (pad 0, eos 1, unk 2, appends </s>)."""
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast(
        tokenizer_object=build_tokenizer_backend(),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=512,
    )
    ids = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    if ids != (0, 1, 2):
        raise RuntimeError(f"tiny tokenizer special ids are {ids}, expected (0, 1, 2)")
    return tokenizer


def build_text_encoder(vocab_size: int, generator_seed: int) -> torch.nn.Module:
    """Build a tiny UMT5EncoderModel with seeded default init."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=vocab_size, **TINY_TEXT_ENCODER_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        model = UMT5EncoderModel(config)
    return model.eval()


@contextlib.contextmanager
def quiet_transformers_progress() -> Iterator[None]:
    """Silence transformers' shard-writing progress bar (it writes to stderr), restoring the setting after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_vae(generator_seed: int) -> torch.nn.Module:
    """Build a tiny AutoencoderKLWan (real latents_mean/std defaults) with seeded default init."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        model = AutoencoderKLWan(**TINY_VAE_CONFIG)
    return model.eval()


def write_scheduler(directory: Path) -> None:
    """Write scheduler_config.json exactly as diffusers serialises the Wan2.2 UniPC scheduler."""
    from diffusers import UniPCMultistepScheduler

    UniPCMultistepScheduler(**WAN22_SCHEDULER_CONFIG).save_config(directory)


def write_model_index(directory: Path) -> None:
    """Write a WanPipeline model_index.json like the Wan2.2-T2V-A14B-Diffusers repo's."""
    import diffusers

    write_json(
        directory / "model_index.json",
        {
            "_class_name": "WanPipeline",
            "_diffusers_version": diffusers.__version__,
            "boundary_ratio": 0.875,
            "expand_timesteps": False,
            "scheduler": ["diffusers", "UniPCMultistepScheduler"],
            "text_encoder": ["transformers", "UMT5EncoderModel"],
            "tokenizer": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "transformer_2": ["diffusers", "WanTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLWan"],
        },
    )


def write_shared_components(directory: Path, seed: int) -> None:
    """Write tokenizer/, text_encoder/, vae/ and scheduler/ into one pipeline directory."""
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(directory / "tokenizer")
    text_encoder = build_text_encoder(len(tokenizer), seed * 1000 + SEED_TEXT_ENCODER)
    # float32 keeps CPU comparisons exact; sharded like the real text_encoder/.
    with quiet_transformers_progress():
        text_encoder.save_pretrained(directory / "text_encoder", max_shard_size="100KB")
    build_vae(seed * 1000 + SEED_VAE).save_pretrained(directory / "vae", safe_serialization=True)
    write_scheduler(directory / "scheduler")


def copy_shared_components(source: Path, target: Path) -> None:
    """Copy the non-transformer components, so both pipelines hold identical files."""
    for name in ("tokenizer", "text_encoder", "vae", "scheduler"):
        shutil.copytree(source / name, target / name)


def shard_tensors(tensors: dict[str, torch.Tensor], num_shards: int) -> list[dict[str, torch.Tensor]]:
    """Split tensors (sorted by key, round-robin) into ``num_shards`` groups; ema and decoys interleave."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for index, key in enumerate(sorted(tensors)):
        shards[index % num_shards][key] = tensors[key]
    return shards


def save_sharded(tensors: dict[str, torch.Tensor], directory: Path, num_shards: int = 3) -> None:
    """Save ``model-0000N-of-0000M.safetensors`` shards plus ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total_size = 0
    for number, shard in enumerate(shard_tensors(tensors, num_shards), start=1):
        filename = f"model-{number:05d}-of-{num_shards:05d}.safetensors"
        contiguous = {key: value.contiguous() for key, value in shard.items()}
        save_file(contiguous, str(directory / filename), metadata={"format": "pt"})
        for key, value in contiguous.items():
            weight_map[key] = filename
            total_size += value.numel() * value.element_size()
    write_json(directory / "model.safetensors.index.json", {"metadata": {"total_size": total_size}, "weight_map": weight_map})


def separate_tensors(model: torch.nn.Module, prefix: str, decoy_generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Tensors of one separate expert ckpt: EMA weights under ``ema.<prefix>`` plus decoys to ignore."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in sorted(model.state_dict().items()):
        weight = value.detach().to(torch.float32).clone()
        tensors[f"ema.{prefix}{key}"] = weight
        # Non-EMA training copy with different values: correct loading must skip it.
        noise = torch.randn(weight.shape, generator=decoy_generator, dtype=torch.float32)
        tensors[f"{prefix}{key}"] = weight + 0.5 * noise
    # A few text-encoder tensors that also live in the real files.
    tensors["ema.diff_dec.text_encoder.shared.weight"] = torch.randn((16, 32), generator=decoy_generator)
    tensors["ema.diff_dec.text_encoder.encoder.final_layer_norm.weight"] = torch.randn((32,), generator=decoy_generator)
    tensors["ema.diff_dec.text_encoder.encoder.block.0.layer.0.SelfAttention.q.weight"] = torch.randn(
        (32, 32), generator=decoy_generator
    )
    return tensors


def write_bernini_diffusers(directory: Path, high: torch.nn.Module, low: torch.nn.Module, seed: int) -> None:
    """Write Bernini-R-Diffusers: bernini config.json, both experts and the shared components."""
    write_json(directory / "config.json", BERNINI_RENDERER_CONFIG)
    save_transformer(high, directory / "transformer")
    save_transformer(low, directory / "transformer_2")
    write_shared_components(directory, seed)


def write_wan_base(directory: Path, source: Path, seed: int) -> None:
    """Write the Wan2.2 base: model_index.json, its own expert weights, shared components copied."""
    directory.mkdir(parents=True, exist_ok=True)
    write_model_index(directory)
    save_transformer(build_transformer(generator_for(seed, SEED_BASE_HIGH)), directory / "transformer")
    save_transformer(build_transformer(generator_for(seed, SEED_BASE_LOW)), directory / "transformer_2")
    copy_shared_components(source, directory)


def write_separate(directory: Path, high: torch.nn.Module, low: torch.nn.Module, seed: int) -> None:
    """Write Bernini-R: bernini_renderer_high/ and bernini_renderer_low/ float32 sharded ckpts."""
    high_tensors = separate_tensors(high, "diff_dec.transformer.", generator_for(seed, SEED_DECOY_HIGH))
    low_tensors = separate_tensors(low, "diff_dec.transformer_2.", generator_for(seed, SEED_DECOY_LOW))
    save_sharded(high_tensors, directory / HIGH_NAME)
    save_sharded(low_tensors, directory / LOW_NAME)


def make_tiny_checkpoints(root: Path, seed: int = 0) -> TinyCheckpoints:
    """Write the three tiny checkpoint folders under ``root`` (which must not already hold them)."""
    layout = layout_for(root)
    existing = [path for path in layout.paths() if path.exists()]
    if existing:
        raise FileExistsError(f"{existing[0]} already exists; pick an empty directory or delete it first")
    layout.root.mkdir(parents=True, exist_ok=True)
    high = build_transformer(generator_for(seed, SEED_HIGH))
    low = build_transformer(generator_for(seed, SEED_LOW))
    write_bernini_diffusers(layout.diffusers, high, low, seed)
    write_wan_base(layout.wan_base, layout.diffusers, seed)
    write_separate(layout.separate, high, low, seed)
    logger.info("wrote tiny checkpoints (seed %d) under %s", seed, layout.root)
    return layout


def default_cache_root() -> Path:
    """``$BERNINI_TINY_DIR`` if set, else ``<repo>/.tiny``."""
    override = os.environ.get("BERNINI_TINY_DIR")
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parent.parent / ".tiny"


def marker_contents(seed: int) -> str:
    """Marker text; library versions are part of it since they decide the saved formats."""
    import diffusers
    import transformers

    stamp = {
        "format": TINY_FORMAT_VERSION,
        "seed": seed,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    return json.dumps(stamp, sort_keys=True) + "\n"


def is_complete(cache_root: Path, seed: int) -> bool:
    """True when the marker (written last) exists, matches and every folder is present."""
    marker = cache_root / MARKER_NAME
    if not marker.is_file() or marker.read_text(encoding="utf-8") != marker_contents(seed):
        return False
    return all(path.is_dir() for path in layout_for(cache_root).paths())


def tiny_checkpoints(cache_root: Path | None = None, seed: int = 0) -> TinyCheckpoints:
    """Build the tiny checkpoints once into a cache dir and reuse them while complete."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    if is_complete(root, seed):
        return layout_for(root)
    logger.info("building tiny checkpoints in %s", root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER_NAME).unlink(missing_ok=True)
    # Build aside, then move in: a crash or a concurrent reader never sees a half-written folder as done.
    staging = root / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    built = make_tiny_checkpoints(staging, seed)
    final = layout_for(root)
    for source, target in zip(built.paths(), final.paths()):
        shutil.rmtree(target, ignore_errors=True)
        source.rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    (root / MARKER_NAME).write_text(marker_contents(seed), encoding="utf-8")
    return final


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``make-tiny DIR [--seed N]``."""
    parser = argparse.ArgumentParser(prog="python -m bernini.testing", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-tiny", help="write tiny random-weight checkpoints in the real layouts")
    make.add_argument("directory", type=Path, help="output directory (created if needed)")
    make.add_argument("--seed", type=int, default=0, help="random seed (same seed -> identical tensors)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: ``python -m bernini.testing make-tiny DIR [--seed 0]``."""
    args = parse_args(argv)
    layout = make_tiny_checkpoints(args.directory, seed=args.seed)
    for path in layout.paths():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
