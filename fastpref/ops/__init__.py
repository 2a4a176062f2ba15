"""The public fused ops. Each returns per-row float32 values; the caller reduces."""

from fastpref.ops._native import release_kernel_buffers
from fastpref.ops.infonce import infonce
from fastpref.ops.linear_logprobs import linear_entropy, linear_logprobs, sequence_logprobs
from fastpref.ops.listwise import listwise_loss
from fastpref.ops.similarity_topk import SimilarityTopK, similarity_topk

__all__: list[str] = [
    "linear_logprobs",
    "sequence_logprobs",
    "linear_entropy",
    "listwise_loss",
    "infonce",
    "similarity_topk",
    "SimilarityTopK",
    "release_kernel_buffers",
]
