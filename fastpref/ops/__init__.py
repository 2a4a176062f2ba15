"""The public fused ops. Each returns per-row float32 values; the caller reduces."""

__all__: list[str] = []
