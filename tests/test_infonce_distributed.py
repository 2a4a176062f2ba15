"""infonce(gather=True) on two CPU processes (gloo) equals one process holding the global batch.

Each rank holds a slice of the same global batch; it backpropagates ``(loss * w_rank).sum()`` for
a random upstream weight w. The gathered op must return the global-batch loss of the rank's own
queries and give each rank's queries and passages the gradient of Σ_ranks of those scalars,
i.e. the single-process gradient of ``(loss_global * w).sum()`` restricted to the rank's rows.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastpref.ops.infonce import infonce, infonce_reference

WORLD = 2
D = 8
# name: (queries per rank, passages per rank or None for groups of G, G, options).
# Uneven ranks (a short last batch) exercise the padded gather; explicit positives exercise the
# rank offset of positive_index; group-only must stay local and still equal the global batch.
CASES = {
    "in_batch": ((3, 3), None, 2, {}),
    "clip_symmetric": ((4, 4), None, 1, {"symmetric": True}),
    "uneven_symmetric": ((2, 5), None, 3, {"symmetric": True}),
    "explicit_pos_dot": ((3, 2), (7, 4), None, {"normalize": False, "temperature": 0.5}),
    "group_only": ((3, 2), None, 2, {"in_batch": False}),
}


def _global_batch(name: str):
    b_sizes, m_sizes, G, _ = CASES[name]
    m_sizes = m_sizes or tuple(b * G for b in b_sizes)
    g = torch.Generator().manual_seed(len(name))
    q = torch.randn(sum(b_sizes), D, generator=g)
    p = torch.randn(sum(m_sizes), D, generator=g)
    w = torch.rand(sum(b_sizes), generator=g) + 0.5
    if G is None:  # local positives in each rank's own passages, shifted to global numbering
        local = [
            torch.randint(0, m, (b,), generator=g) for b, m in zip(b_sizes, m_sizes, strict=True)
        ]
        offsets = [sum(m_sizes[:r]) for r in range(WORLD)]
        pos = torch.cat([lp + off for lp, off in zip(local, offsets, strict=True)])
    else:
        pos = torch.arange(sum(b_sizes)) * G
    return q, p, w, pos, b_sizes, m_sizes


def _rank_slices(b_sizes, m_sizes, rank):
    b0, m0 = sum(b_sizes[:rank]), sum(m_sizes[:rank])
    return slice(b0, b0 + b_sizes[rank]), slice(m0, m0 + m_sizes[rank]), m0


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = {}
        for name, (_, _, G, opts) in CASES.items():
            q_all, p_all, w, pos, b_sizes, m_sizes = _global_batch(name)
            bs, ms, m0 = _rank_slices(b_sizes, m_sizes, rank)
            q = q_all[bs].clone().requires_grad_(True)
            p = p_all[ms].clone().requires_grad_(True)
            local_pos = None if G is not None else pos[bs] - m0
            loss = infonce(q, p, local_pos, gather=True, backend="chunked", **opts)
            (loss * w[bs]).sum().backward()
            results[name] = (loss.detach(), q.grad, p.grad)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infonce_dist")
    # Fork, not spawn: a spawned child spends seconds re-importing torch and torch._dynamo (the
    # first custom-op call imports it), so warm that up here once. Safe as in DataLoader
    # workers: the children run single-threaded (torch.set_num_threads(1)) and start no OpenMP
    # pool. A FileStore rendezvous: no TCP port to pick, so no collision with other runs.
    infonce(torch.randn(2, 4), torch.randn(2, 4), backend="chunked")
    args = (str(tmp / "store"), str(tmp))
    mp.start_processes(_worker, args=args, nprocs=WORLD, join=True, start_method="fork")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_gather_equals_global_batch(rank_results, name):
    _, _, _, opts = CASES[name]
    q_all, p_all, w, pos, b_sizes, m_sizes = _global_batch(name)
    q_all.requires_grad_(True)
    p_all.requires_grad_(True)
    loss = infonce_reference(q_all, p_all, pos, **opts)
    (loss * w).sum().backward()
    for rank in range(WORLD):
        bs, ms, _ = _rank_slices(b_sizes, m_sizes, rank)
        got_loss, got_dq, got_dp = rank_results[rank][name]
        torch.testing.assert_close(got_loss, loss.detach()[bs], msg=f"{name} rank {rank} loss")
        torch.testing.assert_close(got_dq, q_all.grad[bs], msg=f"{name} rank {rank} d_queries")
        torch.testing.assert_close(got_dp, p_all.grad[ms], msg=f"{name} rank {rank} d_passages")


def test_gather_sees_other_ranks():
    """Guard against a vacuous pass: without gather the ranks' losses differ from the global."""
    q_all, p_all, _, pos, b_sizes, m_sizes = _global_batch("in_batch")
    bs, ms, _ = _rank_slices(b_sizes, m_sizes, 0)
    local = infonce_reference(q_all[bs], p_all[ms])
    global_rows = infonce_reference(q_all, p_all, pos)[bs]
    assert (global_rows - local).abs().max() > 0.1
