"""The public fused ops. Each returns per-row float32 values; the caller reduces."""

from fastpref.ops.listwise import listwise_loss

__all__: list[str] = ["listwise_loss"]
