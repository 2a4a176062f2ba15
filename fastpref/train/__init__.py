"""The family-free trainer: config, DeepSpeed engine, reference values, metrics, checkpoints,
the loop."""

from fastpref.errors import InputError
from fastpref.train.config import ConfigError, TrainConfig, build_parser, parse_config
from fastpref.train.loop import train

__all__ = ["ConfigError", "InputError", "TrainConfig", "build_parser", "parse_config", "train"]
