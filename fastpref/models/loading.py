"""Loading models and tokenizers: a Hugging Face checkpoint (local path or hub name) or the
bundled tiny Llama built from its config, with load failures turned into ``ModelError`` and a
model identity for reference-cache keys. How a loaded model yields what a loss needs is in the
adapters beside this file (``causal_lm``, ``reward``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from torch import nn

from fastpref.errors import MissingPathError, ModelError
from fastpref.paths import bundled_model_config_path, bundled_tokenizer_path, looks_local

__all__ = [
    "ModelError",
    "attention_implementation",
    "build_or_load_causal_lm",
    "build_or_load_reward_model",
    "check_model_path",
    "load_tokenizer",
    "loading",
    "model_identity",
    "trusted_kwargs",
]


@contextlib.contextmanager
def loading(flag: str, path: str) -> Iterator[None]:
    """Turn transformers' load failures (missing files, unknown architecture, no hub) into
    ModelError naming the flag and the path."""
    if not looks_local(path) and _hub_offline():
        raise ModelError(
            f"--{flag} {path!r} is not a local path and the hub is unreachable "
            "(HF_HUB_OFFLINE=1 or no network)"
        )
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        if not looks_local(path) and _is_connection_error(e):
            raise ModelError(
                f"--{flag} {path!r} is not a local path and the hub is unreachable "
                "(HF_HUB_OFFLINE=1 or no network)"
            ) from e
        raise ModelError(f"--{flag} {path!r}: cannot load it ({type(e).__name__}: {e})") from e


def _hub_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _is_connection_error(e: BaseException) -> bool:
    """A failure to reach the hub (as opposed to a hub answer such as 'no such repo')."""
    while e is not None:
        name = type(e).__name__
        if "Connection" in name or "Timeout" in name or "OfflineMode" in name:
            return True
        if "couldn't connect" in str(e).lower() or "offline mode" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


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

    A string that must be a local path (``fastpref.paths.looks_local``) must exist; ``gpt2``
    and ``org/name`` are left to the Hub.
    """
    if path is None or os.path.exists(os.path.expanduser(path)):
        return
    if looks_local(path):
        raise MissingPathError(f"--{what}: {path!r} does not exist")
    if _hub_offline():
        raise MissingPathError(
            f"--{what} {path!r} is not a local path and the hub is unreachable "
            "(HF_HUB_OFFLINE=1 or no network)"
        )


def _version_kwargs(dtype: torch.dtype | None) -> dict:
    if dtype is None:
        return {}
    new = int(transformers.__version__.split(".")[0]) >= 5
    return {"dtype": dtype} if new else {"torch_dtype": dtype}


def load_tokenizer(path: str | None, flag: str = "tokenizer"):
    """The tokenizer at ``path`` (or the bundled one); a pad token is set to EOS if missing.
    ``flag`` is the option that gave ``path`` (named in errors)."""
    from transformers import AutoTokenizer

    if path is None:
        path = str(bundled_tokenizer_path())
    with loading(flag, path):
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _bundled_config(vocab_size: int, **overrides):
    from transformers import AutoConfig

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
    allow_pickle: bool = False,
    flag: str = "model",
) -> nn.Module:
    """The causal LM at ``path``, or (``path=None``) the bundled tiny Llama built with ``seed``.

    The built model's weights depend only on the bundled config and ``seed`` (the global RNG is
    left untouched), so the policy and a reference built the same way are identical. Loading
    refuses model code shipped with a checkpoint unless ``trust_remote_code`` and pickle weights
    unless ``allow_pickle`` (see :func:`trusted_kwargs`); ``flag`` names the option in errors.
    """
    from transformers import AutoModelForCausalLM

    attn = attention_implementation(attn, dtype)
    if path is not None:
        check_model_path(path, flag)
        with loading(flag, path):
            return AutoModelForCausalLM.from_pretrained(
                path,
                attn_implementation=attn,
                **trusted_kwargs(path, flag, trust_remote_code, allow_pickle),
                **_version_kwargs(dtype),
            )
    config = _bundled_config(vocab_size, attn_implementation=attn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype) if dtype is not None else model


def build_or_load_reward_model(
    path: str | None,
    *,
    vocab_size: int,
    pad_token_id: int,
    seed: int,
    attn: str = "auto",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    flag: str = "model",
) -> nn.Module:
    """``AutoModelForSequenceClassification`` with ``num_labels=1`` at ``path`` (a causal-LM
    checkpoint gets a freshly initialised head), or the bundled tiny Llama built with ``seed``.
    Trust and pickle rules as :func:`build_or_load_causal_lm`."""
    from transformers import AutoModelForSequenceClassification

    attn = attention_implementation(attn, dtype)
    if path is not None:
        check_model_path(path, flag)
        with loading(flag, path):
            model = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=1,
                attn_implementation=attn,
                **trusted_kwargs(path, flag, trust_remote_code, allow_pickle),
                **_version_kwargs(dtype),
            )
    else:
        config = _bundled_config(vocab_size, num_labels=1, attn_implementation=attn)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_config(config)
        model = model.to(dtype) if dtype is not None else model
    model.config.pad_token_id = pad_token_id
    return model


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def trusted_kwargs(path: str, flag: str, trust_remote_code: bool, allow_pickle: bool) -> dict:
    """``from_pretrained`` keywords that load only what the user trusted: a local checkpoint
    that ships model code (``auto_map`` in its config) is refused without
    ``--trust-remote-code``, and one whose weights are only pickle files (``.bin``: unpickling
    can run code) without ``--allow-pickle``; weights load through safetensors otherwise."""
    local = Path(os.path.expanduser(path))
    if local.is_dir():
        config = local / "config.json"
        try:
            auto_map = "auto_map" in json.loads(config.read_text()) if config.exists() else False
        except (OSError, json.JSONDecodeError):
            auto_map = False
        if auto_map and not trust_remote_code:
            raise ModelError(
                f"--{flag} {path!r} ships its own model code (auto_map in config.json); pass "
                "--trust-remote-code to run it, only for a checkpoint you trust"
            )
        names = [p.name for p in local.iterdir()]
        has_safe = any(n.endswith(".safetensors") for n in names)
        pickled = [n for n in names if n.endswith(_PICKLE_SUFFIXES) and "training_args" not in n]
        if pickled and not has_safe and not allow_pickle:
            raise ModelError(
                f"--{flag} {path!r} has only pickle weights ({', '.join(sorted(pickled))}); "
                "loading them can run code: pass --allow-pickle for a checkpoint you trust, or "
                "convert it to safetensors"
            )
        if pickled and not has_safe:
            return {"trust_remote_code": trust_remote_code, "use_safetensors": False}
    return {"trust_remote_code": trust_remote_code, "use_safetensors": not allow_pickle or None}


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
