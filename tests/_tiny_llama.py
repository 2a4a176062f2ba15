"""A 2-layer Llama built from a config (no download) and the check that a model whose modules
were swapped (oneDNN linears, native decoder ops) trains as the plain one does."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def assert_same_loss_and_grads(plain, swapped) -> torch.Tensor:
    """One LM loss + backward on both: losses within 1e-5 and every gradient within 1e-4
    relative of the plain model's; returns the batch of ids."""
    ids = torch.randint(0, 101, (3, 45), generator=torch.Generator().manual_seed(2))
    losses = []
    for model in (plain, swapped):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    grads = {k: p.grad for k, p in plain.named_parameters()}
    for k, p in swapped.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], rtol=1e-4, atol=1e-6, msg=k)
    return ids
