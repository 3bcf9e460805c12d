"""UMT5 prompt encoding: the task prefix, Wan's prompt cleaning, 512 tokens, zeros past the length."""

from __future__ import annotations

import html
import logging
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: repair mojibake, unescape HTML twice, collapse whitespace."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def positive_text(system_prompt: str, prompt: str) -> str:
    """What UMT5 sees for the positive branch: the system prompt glued to the cleaned prompt."""
    return system_prompt + clean_prompt(prompt)


class TextEncoder:
    """Tokenizer + UMT5 encoder; encode() gives [B, max_length, d_model] with zeros past each length."""

    def __init__(self, tokenizer, model: torch.nn.Module, max_length: int = 512):
        self.tokenizer = tokenizer
        self.model = model
        self.max_length = max_length

    @classmethod
    def load(cls, base: Path, *, dtype: torch.dtype, device: torch.device | str, max_length: int = 512) -> "TextEncoder":
        from transformers import AutoTokenizer, UMT5EncoderModel

        tokenizer = AutoTokenizer.from_pretrained(base / "tokenizer")
        model = UMT5EncoderModel.from_pretrained(base / "text_encoder", dtype=dtype).to(device).eval()
        log.info("text encoder: %s (%s)", base / "text_encoder", dtype)
        return cls(tokenizer, model, max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        hidden = self.model(ids, mask).last_hidden_state
        return hidden * mask[..., None].to(hidden.dtype)  # zero past each prompt's real length
