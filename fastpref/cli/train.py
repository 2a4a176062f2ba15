"""``fastpref-train``: parse options, then hand them to :func:`fastpref.train.train`.

One process: ``fastpref-train --loss dpo ...``; several: ``torchrun --nproc_per_node N -m
fastpref.cli.train ...`` or ``deepspeed -m fastpref.cli.train ...``. With no options it trains the
bundled tiny Llama on the bundled rationale dataset with ``--loss rorpo``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from fastpref.errors import TrainingError
    from fastpref.train import InputError, parse_config, train

    try:
        cfg = parse_config(argv)
        train(cfg)
    except (InputError, FileNotFoundError) as e:  # bad input, found before training
        print(f"fastpref-train: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:  # training could not go on; what was written is kept
        print(f"fastpref-train: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
