"""Model code: the Wan2.2 DiT with packed multi-source sequences, its RoPE, text encoder and VAE.

Exports what callers outside the package use; a test of one layer (Block, FeedForward, ...) imports
it from its module.
"""

from bernini.models.rope import apply_rope, rope_tables, source_ids
from bernini.models.text_encoder import TextEncoder, positive_text
from bernini.models.transformer import (
    LocalSequence,
    TextKV,
    TransformerConfig,
    WanTransformer,
    compile_blocks,
    fuse_projections,
    patchify,
    unpatchify,
)
from bernini.models.vae import VAE

__all__ = [
    "VAE", "LocalSequence", "TextEncoder", "TextKV", "TransformerConfig", "WanTransformer", "apply_rope",
    "compile_blocks", "fuse_projections", "patchify", "positive_text", "rope_tables", "source_ids", "unpatchify",
]
