"""``fastpref-train``: parse options, then hand them to :func:`fastpref.train.train`.

One process: ``fastpref-train --loss dpo ...``; several: ``torchrun --nproc_per_node N -m
fastpref.cli.train ...`` or ``deepspeed -m fastpref.cli.train ...``. With no options it trains the
bundled tiny Llama on the bundled rationale dataset with ``--loss rorpo``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from fastpref.losses import LOSSES, get_loss
    from fastpref.train import ConfigError, parse_config

    names = list(LOSSES)
    try:
        cfg = parse_config(argv, names)
        get_loss(cfg.loss)  # unknown loss -> ValueError listing the choices
    except ValueError as e:  # ConfigError too
        print(f"fastpref-train: error: {e}", file=sys.stderr)
        return 2

    from fastpref.data import DataError
    from fastpref.models import ModelError
    from fastpref.train import train

    try:
        train(cfg)
    except (ConfigError, DataError, ModelError, FileNotFoundError) as e:
        print(f"fastpref-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
