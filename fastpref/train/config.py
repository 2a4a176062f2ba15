"""The trainer's configuration: one typed dataclass, filled from defaults < ``--config`` < flags.

Every field becomes a flag (``micro_batch`` -> ``--micro-batch``; booleans get ``--no-...``);
``--help`` prints each field's one-line description and its default. A YAML or JSON file given
with ``--config`` may set any field (keys with ``_`` or ``-``); flags override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ConfigError", "TrainConfig", "build_parser", "parse_config", "LOSS_HPARAMS"]


class ConfigError(ValueError):
    """A bad option or configuration file (reported before anything is loaded)."""


def _opt(default: object, help: str) -> object:  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # objective and model
    loss: str = _opt("rorpo", "objective (see the list below)")
    model: str | None = _opt(
        None, "HF causal LM path or hub name; unset: build the bundled tiny Llama"
    )
    ref_model: str | None = _opt(
        None, "reference model; unset: the initial policy; 'none': no reference"
    )
    tokenizer: str | None = _opt(None, "tokenizer path; unset: --model's, else the bundled one")
    trust_remote_code: bool = _opt(False, "let transformers run code shipped with the model")
    attn_implementation: str = _opt("auto", "auto (sdpa; flash_attention_2 with flash-attn on GPU)")
    # data
    data: str | None = _opt(
        None, "training data (.jsonl/.json/.csv/.parquet or hub name); unset: bundled"
    )
    columns: dict[str, str] | None = _opt(
        None, "column remapping canonical=source,... e.g. prompt=question"
    )
    eval_split: str | None = _opt(None, "held-out data file; unset: --eval-fraction of --data")
    eval_fraction: float = _opt(0.1, "fraction of --data held out when no --eval-split is given")
    max_length: int = _opt(192, "max tokens of prompt+completion (the prompt's start is cut first)")
    # optimisation
    lr: float | None = _opt(
        None, "peak lr; unset: 2e-3 built tiny model, else 1e-5 sft/rm, 5e-7 others"
    )
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    scheduler: str = _opt(
        "cosine", "learning-rate schedule after warmup: cosine | linear | constant"
    )
    warmup_ratio: float = _opt(0.1, "fraction of the steps spent warming the lr up linearly from 0")
    epochs: float | None = _opt(
        None, "passes over the data; unset: 1, or 60 steps for the embedded default"
    )
    max_steps: int | None = _opt(None, "optimizer steps (overrides --epochs)")
    micro_batch: int = _opt(8, "examples per micro-batch per process")
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 = off)")
    seed: int = _opt(0, "seed of the model init, the data split and the data order")
    # DeepSpeed
    zero_stage: int = _opt(0, "ZeRO stage 0..3")
    bf16: bool = _opt(False, "train in bfloat16 (DeepSpeed bf16 mode)")
    offload: bool = _opt(False, "ZeRO-Offload: optimizer state (and params at stage 3) on the CPU")
    deepspeed: str | None = _opt(
        None, "full DeepSpeed JSON config; its 'auto' values come from flags"
    )
    # reference log-probs
    ref_in_pass: bool = _opt(False, "compute reference log-probs in each step instead of once")
    cache_dir: str | None = _opt(None, "reference log-prob cache; unset: ~/.cache/fastpref")
    # evaluation, logging, checkpoints
    output_dir: str | None = _opt(None, "run directory; unset: runs/<loss>-<time>")
    eval_every: int = _opt(0, "evaluate every N steps (0: five times per run); also at start/end")
    log_every: int = _opt(1, "write a metrics record every N steps")
    tensorboard: bool = _opt(False, "also log to TensorBoard (output_dir/tb)")
    progress: bool = _opt(True, "show a progress bar")
    save_every: int = _opt(0, "DeepSpeed checkpoint every N steps (0: off)")
    save_total_limit: int = _opt(2, "complete checkpoints kept (older ones are deleted)")
    resume: bool = _opt(False, "continue from the latest complete checkpoint in --output-dir")
    # loss hyperparameters (None: the loss's own default; passed only to losses that take them)
    beta: float | None = _opt(None, "β: strength of the preference term (all but sft/rm)")
    label_smoothing: float | None = _opt(None, "ε: label noise of cdpo/robust")
    gamma: float | None = _opt(None, "γ: rationale weight (rdpo/rorpo) or SimPO's margin")
    alpha: float | None = _opt(None, "α: weight of the NLL term of cpo/simpo")
    rationale_term: str | None = _opt(
        None, "rdpo: rationale term, nll (paper) or logsigmoid (authors' code)"
    )
    center_rewards_coefficient: float | None = _opt(None, "rm: weight of the reward-centring term")
    desirable_weight: float | None = _opt(None, "kto: weight of desirable examples")
    undesirable_weight: float | None = _opt(None, "kto: weight of undesirable examples")


# fields that are loss hyperparameters (keyword arguments of the loss functions)
LOSS_HPARAMS = (
    "beta",
    "label_smoothing",
    "gamma",
    "alpha",
    "rationale_term",
    "center_rewards_coefficient",
    "desirable_weight",
    "undesirable_weight",
)
_CHOICES = {"scheduler": ("cosine", "linear", "constant"), "zero_stage": (0, 1, 2, 3)}


def _flag(name: str) -> str:
    return "--" + name.rstrip("_").replace("_", "-")


def _base_type(annotation: object) -> type:
    hint = (
        typing.get_type_hints(TrainConfig)[annotation]
        if isinstance(annotation, str)
        else annotation
    )
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _parse_columns(text: str) -> dict[str, str]:
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected canonical=source[,...], got {text!r}")
    return {k.strip(): v.strip() for k, v in pairs}


def build_parser(loss_names: typing.Sequence[str] = ()) -> argparse.ArgumentParser:
    """The CLI parser. Defaults are shown but not set, so explicit flags can override a file."""
    epilog = f"losses: {', '.join(loss_names)}" if loss_names else None
    parser = argparse.ArgumentParser(
        prog="fastpref-train",
        argument_default=argparse.SUPPRESS,
        epilog=epilog,
        description="Train a causal LM with a preference, SFT or reward objective on DeepSpeed.",
    )
    parser.add_argument("--config", help="YAML or JSON file with any of the options below")
    for f in dataclasses.fields(TrainConfig):
        kind = _base_type(f.name)
        help_text = f"{f.metadata['help']} (default: {f.default})"
        kwargs: dict = {"help": help_text, "dest": f.name}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is dict:
            kwargs["type"] = _parse_columns
        else:
            kwargs["type"] = kind
            kwargs["metavar"] = f.name.rstrip("_").upper()
        if f.name in _CHOICES:
            kwargs["choices"] = _CHOICES[f.name]
        parser.add_argument(_flag(f.name), **kwargs)
    # set by the `deepspeed` launcher; the rank is read from the environment
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def _read_file(path: str) -> dict:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read ({e.strerror or e})") from e
    try:
        if p.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parser error is a config error
        raise ConfigError(
            f"--config {path}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}"
        ) from e
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value at the top level")
    return values


def _coerce(path: str, name: str, value: object) -> object:
    kind = _base_type(name)
    default = TrainConfig.__dataclass_fields__[name].default
    if value is None:
        if default is not None:
            raise ConfigError(f"--config {path}: {name} cannot be null")
        return None
    if kind is dict:
        value = _parse_columns(value) if isinstance(value, str) else value
        ok = isinstance(value, dict)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ConfigError(f"--config {path}: {name} must be {kind.__name__}, got {value!r}")
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ConfigError(f"--config {path}: {name} must be one of {_CHOICES[name]}, got {value!r}")
    return value


def parse_config(
    argv: typing.Sequence[str] | None = None, loss_names: typing.Sequence[str] = ()
) -> TrainConfig:
    """defaults < ``--config`` file < command-line flags."""
    args = vars(build_parser(loss_names).parse_args(argv))
    args.pop("local_rank", None)
    values: dict[str, object] = {}
    config_path = args.pop("config", None)
    if config_path is not None:
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        aliases = {n.rstrip("_"): n for n in names}
        for key, value in _read_file(config_path).items():
            name = aliases.get(str(key).replace("-", "_"))
            if name is None:
                raise ConfigError(
                    f"--config {config_path}: unknown option {key!r} "
                    f"(options: {', '.join(sorted(aliases))})"
                )
            values[name] = _coerce(config_path, name, value)
    values.update(args)
    return TrainConfig(**values)
