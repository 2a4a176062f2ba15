"""The trainer's configuration: one typed dataclass, filled from defaults < ``--config`` < flags.

Every field becomes a flag (``micro_batch`` -> ``--micro-batch``; booleans get ``--no-...``);
``--help`` prints each field's one-line description and its default. A YAML or JSON file given
with ``--config`` may set any field (keys with ``_`` or ``-``); flags override it.

The fields are the loop's own options (declared here, each with its valid range), then every
loss hyperparameter (derived from the loss signatures and ``fastpref.losses.HPARAMS``; unset
means the loss's own default) and every family option (``Family.options``). Values are checked
while parsing, before any model, data or directory is touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastpref.errors import ConfigError
from fastpref.families import FAMILIES, OBJECTIVES, Objective, family_of
from fastpref.losses import HPARAMS

__all__ = [
    "ConfigError",
    "FAMILY_OPTIONS",
    "LOSS_HPARAMS",
    "TrainConfig",
    "build_parser",
    "loss_hparams",
    "parse_config",
]


def _opt(
    default: object,
    help: str,  # noqa: A002 - mirrors argparse
    check: Callable[[object], str | None] | None = None,
    choices: tuple | None = None,
) -> object:
    """A field with its one-line help and its valid range (``check(value)`` -> problem or None)."""
    return field(default=default, metadata={"help": help, "check": check, "choices": choices})


def _positive(v) -> str | None:
    return None if math.isfinite(v) and v > 0 else "must be > 0"


def _nonnegative(v) -> str | None:
    return None if math.isfinite(v) and v >= 0 else "must be >= 0"


def _at_least(n: int) -> Callable[[int], str | None]:
    return lambda v: None if v >= n else f"must be >= {n}"


def _fraction(v) -> str | None:  # [0, 1)
    return None if 0.0 <= v < 1.0 else "must be in [0, 1)"


def _open_fraction(v) -> str | None:  # (0, 1)
    return None if 0.0 < v < 1.0 else "must be in (0, 1)"


@dataclass
class CoreConfig:
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
    allow_pickle: bool = _opt(False, "load pickle (.bin) weights; unpickling can run code")
    attn_implementation: str = _opt("auto", "auto (sdpa; flash_attention_2 with flash-attn on GPU)")
    # data
    data: str | None = _opt(
        None,
        "training data: a .jsonl/.json/.csv/.parquet file, or a hub dataset as NAME or "
        "NAME:SPLIT (TRL's --dataset-name/--dataset-split work too); unset: bundled",
    )
    columns: dict[str, str] | None = _opt(
        None, "column remapping canonical=source,... e.g. prompt=question"
    )
    eval_split: str | None = _opt(None, "held-out data file; unset: --eval-fraction of --data")
    eval_fraction: float = _opt(
        0.1, "fraction of --data held out when no --eval-split is given", _open_fraction
    )
    max_length: int = _opt(
        192, "max tokens of prompt+completion (the prompt's start is cut first)", _at_least(2)
    )
    # optimisation
    lr: float | None = _opt(
        None, "peak lr; unset: 2e-3 built tiny model, else 1e-5 sft/rm, 5e-7 others", _positive
    )
    weight_decay: float = _opt(0.0, "AdamW weight decay", _nonnegative)
    scheduler: str = _opt(
        "cosine",
        "learning-rate schedule after warmup: cosine | linear | constant",
        choices=("cosine", "linear", "constant"),
    )
    warmup_ratio: float = _opt(
        0.1, "fraction of the steps spent warming the lr up linearly from 0", _fraction
    )
    epochs: float | None = _opt(
        None, "passes over the data; unset: 1, or 60 steps for the embedded default", _positive
    )
    max_steps: int | None = _opt(None, "optimizer steps (overrides --epochs)", _at_least(1))
    micro_batch: int = _opt(8, "examples per micro-batch per process", _at_least(1))
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step", _at_least(1))
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 = off)", _nonnegative)
    seed: int = _opt(0, "seed of the model init, the data split and the data order")
    # DeepSpeed
    zero_stage: int = _opt(0, "ZeRO stage 0..3", choices=(0, 1, 2, 3))
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
    eval_every: int = _opt(
        0, "evaluate every N steps (0: every ceil(steps/5), five times); also at start/end",
        _at_least(0),
    )  # fmt: skip
    log_every: int = _opt(1, "write a metrics record every N steps", _at_least(1))
    tensorboard: bool = _opt(False, "also log to TensorBoard (output_dir/tb)")
    progress: bool = _opt(True, "show a progress bar")
    save_every: int = _opt(0, "DeepSpeed checkpoint every N steps (0: off)", _at_least(0))
    save_total_limit: int = _opt(
        2, "complete checkpoints kept (older ones are deleted)", _at_least(1)
    )
    resume: bool = _opt(False, "continue from the latest complete checkpoint in --output-dir")
    nan_policy: str = _opt(
        "skip",
        "a step with a NaN/inf loss or gradient norm: skip its update (warn), or stop",
        choices=("skip", "stop"),
    )
    max_bad_steps: int = _opt(
        10, "--nan-policy skip: stop after this many non-finite steps in a row", _at_least(1)
    )
    overwrite: bool = _opt(False, "replace the finished run (model/, metrics) in --output-dir")


def _hparam_fields() -> list[tuple[str, object, object]]:
    """One field per hyperparameter some registered loss takes (None: the loss's default)."""
    taken = {name for objective in OBJECTIVES.values() for name in objective.hparams()}
    unknown = taken - set(HPARAMS)
    if unknown:
        raise RuntimeError(f"loss hyperparameters without a HPARAMS entry: {sorted(unknown)}")
    out = []
    for name, hp in HPARAMS.items():
        if name in taken:
            check = _hparam_check(name, hp.check)
            out.append((name, hp.type | None, _opt(None, hp.help, check, hp.choices)))
    return out


def _hparam_check(name: str, check) -> Callable[[object], str | None]:
    def problem(value: object) -> str | None:
        try:
            check(name, value)
        except ValueError as e:
            return str(e).removeprefix(name).strip()
        return None

    return problem


def _option_fields() -> list[tuple[str, object, object]]:
    """One field per family option (an option two families declare must agree)."""
    seen: dict[str, object] = {}
    out = []
    for family in FAMILIES:
        for o in family.options:
            if o.name in seen:
                if seen[o.name] != (o.type, o.default):
                    raise RuntimeError(f"families disagree on option --{o.name}")
                continue
            seen[o.name] = (o.type, o.default)
            help_text = f"{o.help} [{family.name}]"
            out.append((o.name, o.type | None, _opt(o.default, help_text, o.check, o.choices)))
    return out


_HPARAM_FIELDS = _hparam_fields()
LOSS_HPARAMS = tuple(name for name, _, _ in _HPARAM_FIELDS)
_OPTION_FIELDS = _option_fields()
FAMILY_OPTIONS = tuple(name for name, _, _ in _OPTION_FIELDS)
TrainConfig = dataclasses.make_dataclass(
    "TrainConfig", _HPARAM_FIELDS + _OPTION_FIELDS, bases=(CoreConfig,)
)
TrainConfig.__doc__ = "Every option of a fastpref-train run (see the module docstring)."
TrainConfig.__module__ = __name__


def loss_hparams(cfg: TrainConfig, objective: Objective) -> dict[str, object]:
    """The hyperparameter flags that were set, checked against the loss's signature, and the
    family options set for another family (errors name the flag and what it takes)."""
    accepted = objective.hparams()
    given = {n: getattr(cfg, n) for n in LOSS_HPARAMS if getattr(cfg, n) is not None}
    for name in given:
        if name not in accepted:
            takes = ", ".join(_flag(k) for k in accepted) or "none"
            raise ConfigError(
                f"{_flag(name)} is not a hyperparameter of {objective.name} (it takes: {takes})"
            )
    family = family_of(objective.name)
    own = {o.name for o in family.options}
    for name in FAMILY_OPTIONS:
        default = TrainConfig.__dataclass_fields__[name].default
        if name not in own and getattr(cfg, name) != default:
            raise ConfigError(
                f"{_flag(name)} is not an option of --loss {objective.name} (family {family.name})"
            )
    return given


def losses_by_family() -> str:
    """The epilog of --help: every --loss grouped by family."""
    lines = ["losses, by family:"]
    for family in FAMILIES:
        names = ", ".join(o.name for o in family.objectives)
        lines.append(f"  {family.name} ({family.summary}): {names}")
    lines += ["", "data columns each --loss reads (rename with --columns field=column,...):"]
    for family in FAMILIES:
        for o in family.objectives:
            lines.append(f"  {o.name:<8} {o.columns}")
    return "\n".join(lines)


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


_EXAMPLES = """\
examples:
  fastpref-train --loss rorpo                                  # embedded default, offline, CPU
  fastpref-train --loss dpo --model PATH --data prefs.jsonl --beta 0.1 --output-dir runs/dpo
  torchrun --nproc_per_node 2 -m fastpref.cli.train --loss kto --model PATH --data kto.jsonl
"""


def build_parser() -> argparse.ArgumentParser:
    """The CLI parser. Defaults are shown but not set, so explicit flags can override a file."""
    parser = argparse.ArgumentParser(
        prog="fastpref-train",
        argument_default=argparse.SUPPRESS,
        epilog=losses_by_family() + "\n\n" + _EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model with a preference, ranking, contrastive, SFT or reward "
        "objective on DeepSpeed.",
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
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(_flag(f.name), **kwargs)
    # TRL's spellings of a hub dataset: --dataset-name NAME [--dataset-split SPLIT] = --data
    parser.add_argument("--dataset-name", dest="dataset_name", help=argparse.SUPPRESS)
    parser.add_argument("--dataset-split", dest="dataset_split", help=argparse.SUPPRESS)
    # set by the `deepspeed` launcher; the rank is read from the environment
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def _check_ranges(values: dict[str, object]) -> None:
    """Every set value within its declared range: ConfigError naming the flag."""
    for name, value in values.items():
        meta = TrainConfig.__dataclass_fields__[name].metadata
        if value is None:
            continue
        choices = meta.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{_flag(name)} must be one of {choices}, got {value!r}")
        check = meta.get("check")
        problem = check(value) if check is not None else None
        if problem:
            raise ConfigError(f"{_flag(name)} {problem}, got {value!r}")


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
    return value


def parse_config(argv: typing.Sequence[str] | None = None) -> TrainConfig:
    """defaults < ``--config`` file < command-line flags, each value checked against its range."""
    args = vars(build_parser().parse_args(argv))
    args.pop("local_rank", None)
    name, split = args.pop("dataset_name", None), args.pop("dataset_split", None)
    if name is not None or split is not None:
        if name is None or "data" in args:
            raise ConfigError("give the data once: --data NAME:SPLIT, or --dataset-name NAME")
        args["data"] = f"{name}:{split}" if split else name
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
    _check_ranges(values)
    return TrainConfig(**values)
