"""Tokenizer loading and caption batching (truncate to max_len - 2 wordpieces, add [CLS]/[SEP])."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, BertTokenizer, PreTrainedTokenizerBase

from hat.config import MODEL_CONFIG_DIR, HATConfig
from hat.hub import require_hub


def load_tokenizer(config: HATConfig, path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Load from ``path`` (a checkpoint folder) when given, else from the config's source."""
    if path is not None:
        return AutoTokenizer.from_pretrained(str(path))
    source = config.tokenizer or config.text_backbone
    bundled = MODEL_CONFIG_DIR / source
    if source.endswith(".txt") and bundled.is_file():
        return BertTokenizer(vocab=str(bundled), do_lower_case=True)
    if not Path(source).is_dir():
        require_hub(f"tokenizer {source!r}", "--tokenizer")
    return AutoTokenizer.from_pretrained(source)


def tokenize(
    tokenizer: PreTrainedTokenizerBase, captions: list[str], max_len: int
) -> dict[str, torch.Tensor]:
    """Batch captions as ``input_ids`` and ``attention_mask`` padded to the longest one."""
    if isinstance(captions, str):
        raise TypeError("tokenize expects a list of captions, not one string")
    encoded = tokenizer(
        list(captions),
        padding="longest",
        truncation=True,
        max_length=max_len,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
