"""Locate Bernini-R / Wan2.2 checkpoints and load their safetensors into meta-device modules.

Exports what callers outside the package use; the helpers behind them stay in their modules
(locate, keys, load, check, identity, errors).
"""

from bernini.weights.check import preflight
from bernini.weights.errors import MAX_EXAMPLES, CheckpointError, WeightsError, first_line
from bernini.weights.identity import checkpoint_identity
from bernini.weights.keys import find_expert_tensors, select_expert_keys
from bernini.weights.load import cast_tensor, load_weights, normalize_source
from bernini.weights.locate import (
    PICKLE_SUFFIXES,
    TensorRef,
    find_safetensors,
    hub_cache_dir,
    hub_offline,
    looks_like_repo_id,
    resolve_model_dir,
)

__all__ = [
    "MAX_EXAMPLES", "PICKLE_SUFFIXES", "CheckpointError", "TensorRef", "WeightsError", "cast_tensor", "checkpoint_identity",
    "find_expert_tensors", "find_safetensors", "first_line", "hub_cache_dir", "hub_offline", "load_weights", "looks_like_repo_id",
    "normalize_source", "preflight", "resolve_model_dir", "select_expert_keys",
]
