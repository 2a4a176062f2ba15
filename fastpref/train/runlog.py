"""Metrics out: a JSONL log, optional TensorBoard, and a PNG of the curves at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fastpref.errors import TrainingError

__all__ = ["RunLog", "plot_curves"]


class RunLog:
    """Appends one JSON object per record to ``<output_dir>/metrics.jsonl`` (rank 0 only).

    On ``--resume`` the records after the checkpoint's step (written by the interrupted run) are
    dropped first, so the log reads as one uninterrupted run.
    """

    def __init__(
        self, output_dir: Path, *, enabled: bool, tensorboard: bool, resume_step: int | None
    ):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ModuleNotFoundError as exc:
                raise RuntimeError(
                    "--tensorboard needs the `tensorboard` package: "
                    "pip install 'fastpref[tensorboard]'"
                ) from exc

            self.writer = SummaryWriter(str(Path(output_dir) / "tb"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        with self.path.open("a") as f:
            size = f.tell()
            try:
                f.write(line)
                f.flush()
            except OSError as e:  # disk full: no half line left behind, the run stops
                f.truncate(size)
                raise TrainingError(
                    f"writing {self.path} failed ({e.strerror or e}); its first "
                    f"{size} bytes (every earlier record) are intact"
                ) from e
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self.writer.add_scalar(
                        k if "/" in k or k.startswith("eval") else f"train/{k}", v, record["step"]
                    )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict], path: Path, title: str) -> None:
    """Loss, reward margin, accuracy (train and held-out) and any other held-out metric against
    the step; a panel with nothing to show is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list, list]:
        pts = [
            (r["step"], r[key])
            for r in records
            if isinstance(r.get(key), int | float) and math.isfinite(r[key])
        ]
        return [p[0] for p in pts], [p[1] for p in pts]

    shown = {"eval/loss", "eval/accuracy", "eval/rewards/margins"}
    others = sorted({k for r in records for k in r if k.startswith("eval/") and k not in shown})
    panels = [
        ("loss", ["loss", "eval/loss"]),
        ("reward margin", ["rewards/margins", "eval/rewards/margins"]),
        ("accuracy", ["rewards/accuracies", "eval/accuracy"]),
        ("held-out metrics", others),
    ]
    panels = [(name, keys) for name, keys in panels if any(series(k)[0] for k in keys)]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.7 * max(len(panels), 1), 4))
    for ax, (name, keys) in zip(fig.axes, panels, strict=False):
        for key in keys:
            x, y = series(key)
            if x:
                ax.plot(
                    x, y, marker="o" if key.startswith("eval") else None, markersize=3, label=key
                )
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
