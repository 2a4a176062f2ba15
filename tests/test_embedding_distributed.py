"""Stage 1's loss with ``gather=True`` (``--gather-negatives``) on two CPU processes (gloo) equals
one process holding the global batch — false negatives that cross ranks included.

Each rank holds 3 queries (groups of 2 passages); rank 1's query 0 has rank 0's query 0's positive
as its hard negative, and rank 0's query 2 shares its positive with rank 1's query 1. Rank r
backpropagates ``loss_r · B_r / B`` (its share of the global mean), so the gathered backward must
give each rank's rows the single-process gradient of the global-batch mean.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fastpref.losses import ContrastiveEmbeddings, infonce_loss

WORLD, B, G, D = 2, 3, 2, 8


def _global():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(WORLD * B, D, generator=g, dtype=torch.float64), dim=-1)
    p = F.normalize(torch.randn(WORLD * B * G, D, generator=g, dtype=torch.float64), dim=-1)
    keys = torch.arange(1, WORLD * B * G + 1)
    keys[B * G + 1] = keys[0]  # rank 1 query 0's hard negative = rank 0 query 0's positive
    p[B * G + 1] = p[0]
    keys[(B + 1) * G] = keys[2 * G]  # rank 1 query 1's positive = rank 0 query 2's positive
    p[(B + 1) * G] = p[2 * G]
    positive_keys = keys[torch.arange(WORLD * B) * G][:, None]
    return q, p, keys, positive_keys


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    try:
        q_all, p_all, keys, pos_keys = _global()
        out = {}
        for symmetric in (False, True):
            q = q_all[rank * B : (rank + 1) * B].clone().requires_grad_(True)
            p = p_all[rank * B * G : (rank + 1) * B * G].clone().requires_grad_(True)
            inputs = ContrastiveEmbeddings(
                q, p, keys[rank * B * G : (rank + 1) * B * G], pos_keys[rank * B : (rank + 1) * B],
                gather=True,
            )  # fmt: skip
            loss, _ = infonce_loss(inputs, temperature=0.1, symmetric=symmetric)
            (loss * B / (WORLD * B)).backward()
            out[symmetric] = (loss.detach(), q.grad, p.grad)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embedding_dist")
    infonce_loss(ContrastiveEmbeddings(torch.randn(2, 4), torch.randn(2, 4)))  # warm the op
    args = (str(tmp / "store"), str(tmp))
    mp.start_processes(_worker, args=args, nprocs=WORLD, join=True, start_method="fork")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("symmetric", [False, True])
def test_gathered_loss_equals_the_global_batch(rank_results, symmetric):
    q_all, p_all, keys, pos_keys = _global()
    q_all.requires_grad_(True)
    p_all.requires_grad_(True)
    inputs = ContrastiveEmbeddings(q_all, p_all, keys, pos_keys)
    loss, _ = infonce_loss(inputs, temperature=0.1, symmetric=symmetric)
    loss.backward()
    local_means = []
    for rank in range(WORLD):
        got_loss, got_dq, got_dp = rank_results[rank][symmetric]
        local_means.append(got_loss)
        torch.testing.assert_close(got_dq, q_all.grad[rank * B : (rank + 1) * B])
        torch.testing.assert_close(got_dp, p_all.grad[rank * B * G : (rank + 1) * B * G])
    torch.testing.assert_close(torch.stack(local_means).mean(), loss.detach())
    # not vacuous: the local batch alone (no other rank's passages, no cross-rank masks) differs
    local, _ = infonce_loss(ContrastiveEmbeddings(q_all[:B], p_all[: B * G], keys[: B * G],
                                                  pos_keys[:B]), temperature=0.1)  # fmt: skip
    assert not torch.isclose(local, local_means[0].to(local.dtype))
