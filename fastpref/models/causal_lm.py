"""A causal LM as the fused op sees it: backbone hidden states plus the lm_head (or tied) weight.

The trainer never calls the model's own ``forward`` (which would build the ``[B, T, V]`` logits):
it runs the backbone, then hands the last hidden states, the output-embedding weight and bias, and
the labels to ``fastpref.sequence_logprobs``, which drops every position whose label is
``ignore_index`` before its GEMM. So only completion (and rationale) tokens ever meet the
vocabulary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import Tensor, nn

from fastpref.models.packing import pack_rows, packing_supported
from fastpref.ops import linear_logprobs, sequence_logprobs
from fastpref.ops.linear_logprobs import check_labels

__all__ = [
    "LMHead",
    "ModelError",
    "PolicyLogps",
    "attention_implementation",
    "build_or_load_causal_lm",
    "check_model_path",
    "lm_head",
    "load_tokenizer",
    "model_identity",
]

IGNORE_INDEX = -100


class ModelError(ValueError):
    """A model or tokenizer that cannot be loaded (message names the flag and the path)."""


@contextlib.contextmanager
def loading(flag: str, path: str) -> Iterator[None]:
    """Turn transformers' load failures (missing files, unknown architecture) into ModelError."""
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"--{flag} {path!r}: cannot load it ({type(e).__name__}: {e})") from e


@dataclass(frozen=True)
class LMHead:
    """What the fused op needs from a model's output layer."""

    weight: Tensor  # [V, D] lm_head weight (the input embedding when tied)
    bias: Tensor | None  # [V] or None
    softcap: float | None  # Gemma-2 `final_logit_softcapping`: z = c·tanh(z/c)


def lm_head(model: nn.Module) -> LMHead:
    """The output layer of a Hugging Face causal LM (tied weights resolve to the embedding)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (not a causal LM?)")
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return LMHead(head.weight, getattr(head, "bias", None), float(softcap) if softcap else None)


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack that returns the last hidden states (after the final norm)."""
    if hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
        if decoder is not None:
            return decoder
    return getattr(model, model.base_model_prefix)


class PolicyLogps(nn.Module):
    """``forward(input_ids, attention_mask, labels) -> (Σ log p [N], completion tokens [N])``.

    Equals ``model(input_ids).logits.log_softmax(-1).gather(-1, labels)`` summed over the
    labelled positions (labels already aligned with the hidden states, ``-100`` elsewhere),
    without the ``[N, T, V]`` logits. The wrapper is what DeepSpeed wraps, so under ZeRO-3 the
    lm_head weight is registered as an external parameter of this module: DeepSpeed gathers it
    for the fused op in forward and backward, and its gradient reaches the partitioned shard.

    ``packing=True`` (the default where the model supports it, see ``packing_supported``) runs
    the backbone on the prefix-shared packed batch of ``fastpref.models.packing``: no padding,
    one copy of a prompt its completions share; the result is the same up to float rounding.
    """

    def __init__(self, model: nn.Module, *, zero_stage: int = 0, packing: bool = True) -> None:
        super().__init__()
        self.model = model
        self.packing = packing and packing_supported(model, backbone(model))
        if zero_stage == 3:
            import deepspeed

            head = lm_head(model)
            deepspeed.zero.register_external_parameter(self, head.weight)
            if head.bias is not None:
                deepspeed.zero.register_external_parameter(self, head.bias)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
    ) -> tuple[Tensor, Tensor]:
        tokens = (labels != IGNORE_INDEX).sum(-1).float()
        head = lm_head(self.model)
        if self.packing:  # name a bad label by its (row, position) before packing moves it
            check_labels(labels, head.weight.shape[0], IGNORE_INDEX, "PolicyLogps")
        packed = pack_rows(input_ids, attention_mask, labels) if self.packing else None
        if packed is None:
            hidden = backbone(self.model)(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state  # [N, T, D]
            logps = sequence_logprobs(hidden, head.weight, labels, head.bias, softcap=head.softcap)
            return logps, tokens
        mask = packed.mask
        if self.model.config._attn_implementation == "eager":  # eager adds the mask to scores
            dtype = head.weight.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(dtype).min
            )
        hidden = backbone(self.model)(
            input_ids=packed.input_ids,
            attention_mask=mask,
            position_ids=packed.position_ids,
            use_cache=False,
        ).last_hidden_state  # [rows, L, D]
        scored = hidden.reshape(-1, hidden.shape[-1]).index_select(0, packed.source)
        logp = linear_logprobs(scored, head.weight, packed.targets, head.bias, softcap=head.softcap)
        logps = logp.new_zeros(packed.num_sequences).index_add(0, packed.sequence, logp)
        return logps, tokens


def attention_implementation(requested: str = "auto", dtype: torch.dtype | None = None) -> str:
    """``sdpa`` unless flash-attn is installed (the ``gpu`` extra), a GPU is present and the
    weights are 16-bit (flash-attn has no fp32 kernels)."""
    if requested != "auto":
        return requested
    if not torch.cuda.is_available() or dtype not in (torch.bfloat16, torch.float16):
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "sdpa"
    return "flash_attention_2"


def check_model_path(path: str | None, what: str = "model") -> None:
    """A clear error for a model path that does not exist (before anything is loaded).

    A string that looks like a filesystem path (absolute, ``./``, ``~``, or more than one ``/``)
    must exist; ``org/name`` is left to the Hub.
    """
    if path is None or os.path.exists(os.path.expanduser(path)):
        return
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") != 1
    if looks_local or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"--{what}: {path!r} does not exist")


def _version_kwargs(dtype: torch.dtype | None) -> dict:
    if dtype is None:
        return {}
    new = int(transformers.__version__.split(".")[0]) >= 5
    return {"dtype": dtype} if new else {"torch_dtype": dtype}


def load_tokenizer(path: str | None):
    """The tokenizer at ``path`` (or the bundled one); a pad token is set to EOS if missing."""
    from transformers import AutoTokenizer

    if path is None:
        from fastpref.data import bundled_tokenizer_path

        path = str(bundled_tokenizer_path())
    with loading("tokenizer", path):
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _bundled_config(vocab_size: int, **overrides):
    from transformers import AutoConfig

    from fastpref.data import bundled_model_config_path

    config = AutoConfig.from_pretrained(str(bundled_model_config_path()), **overrides)
    if config.vocab_size < vocab_size:
        config.vocab_size = vocab_size  # never let a token id fall outside the embedding
    return config


def build_or_load_causal_lm(
    path: str | None,
    *,
    vocab_size: int,
    seed: int,
    attn: str = "auto",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The causal LM at ``path``, or (``path=None``) the bundled tiny Llama built with ``seed``.

    The built model's weights depend only on the bundled config and ``seed`` (the global RNG is
    left untouched), so the policy and a reference built the same way are identical.
    """
    from transformers import AutoModelForCausalLM

    attn = attention_implementation(attn, dtype)
    if path is not None:
        check_model_path(path)
        with loading("model", path):
            return AutoModelForCausalLM.from_pretrained(
                path,
                attn_implementation=attn,
                trust_remote_code=trust_remote_code,
                **_version_kwargs(dtype),
            )
    config = _bundled_config(vocab_size, attn_implementation=attn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype) if dtype is not None else model


def _digest_state(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_identity(path: str | None, model: nn.Module) -> str:
    """A string that changes whenever the model's weights may change (for cache keys).

    Built models: config + a digest of every weight. Local checkpoints: resolved path, config and
    size + mtime of each weight file. Hub names: name + config (including its commit hash).
    """
    config = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    if path is None:
        return f"built|{config}|{_digest_state(model)}"
    local = Path(os.path.expanduser(path))
    if not local.exists():
        return f"hub|{path}|{config}"
    files = sorted(p for p in local.rglob("*") if p.suffix in {".safetensors", ".bin", ".pt"})
    stats = [(str(p.relative_to(local)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return f"local|{local.resolve()}|{config}|{stats}"
