"""The trainer: config, DeepSpeed engine, reference log-probs, metrics, checkpoints, the loop."""

from fastpref.train.config import ConfigError, TrainConfig, build_parser, parse_config
from fastpref.train.loop import train

__all__ = ["ConfigError", "TrainConfig", "build_parser", "parse_config", "train"]
