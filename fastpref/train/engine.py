"""Process group, DeepSpeed config and engine, learning-rate schedule.

One process (plain ``fastpref-train``) gets a one-rank process group of its own; ``torchrun`` and
the ``deepspeed`` launcher set ``RANK``/``WORLD_SIZE``/``MASTER_*`` and we join theirs. CPU runs
use DeepSpeed's CPU accelerator and gloo; GPU runs use nccl — nothing else changes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mmap
import os
import socket
import sys
import tempfile
from typing import Any

import torch
from torch import nn

from fastpref.train.config import ConfigError, TrainConfig

__all__ = [
    "ClippedAdamW",
    "deepspeed_config",
    "init_distributed",
    "lr_lambda",
    "make_engine",
    "sparse_embedding_gradients",
]


def _chunkable(p: torch.Tensor, state: dict) -> bool:
    """A low-precision parameter big enough to be stepped by chunks, with every tensor of its
    update contiguous (so a flat view of each lines up with the others)."""
    tensors = (p, p.grad, state["master"], state["exp_avg"], state["exp_avg_sq"])
    return p.numel() > ClippedAdamW.MASTER_CHUNK and all(t.is_contiguous() for t in tensors)


class ClippedAdamW(torch.optim.AdamW):
    """AdamW that clips by the global gradient norm inside its own step, and takes row-sparse
    gradients (an ``nn.Embedding(sparse=True)``) without ever making them dense.

    One ``_foreach_norm`` gives the global norm (kept as ``_global_grad_norm``, which DeepSpeed
    reports from ``get_global_grad_norm``); the clip factor then rides into the fused kernel as
    its ``grad_scale`` (it divides each gradient by it before the update and leaves the clipped
    gradient behind, as ``clip_grad_norm_`` would), so clipping costs no extra pass over the
    gradients. The factor is ``max_norm / (norm + 1e-6)`` capped at 1, as in ``clip_grad_norm_``.

    A sparse gradient is the same update as its dense form: every row's moments decay, rows
    without a gradient see g = 0. It is applied by the same fused kernel on blocks of rows,
    each block's gradient made dense only for that call (a few MiB instead of the whole
    ``[V, D]`` table). A block that has never had a gradient row keeps m = v = 0 and, without
    weight decay, an update of exactly zero, so it is skipped; with the moments on fresh zero
    pages (``_zero_pages_like``), rows that no batch has touched cost neither time nor memory.
    The state (``step``, ``exp_avg``, ``exp_avg_sq``) is AdamW's own, so checkpoints do not care
    which form a gradient had.

    A bfloat16/float16 parameter (``--bf16``) is stepped on a float32 master copy kept in its
    state (``master``, with float32 moments): its gradient is widened to float32, the same
    fused kernel updates the master, and the parameter is the master rounded back. This is the
    mixed-precision step DeepSpeed's bf16 optimizer takes (fp32 master weights and moments), in
    one pass over the tensors instead of its flatten, copy and per-group unflatten (4x this
    optimizer's fp32 step on the bench's tiny Llama, bench/bench_step_breakdown.py). The
    gradients themselves stay in the parameter's dtype, as under DeepSpeed's ZeRO-0 bf16.
    """

    SPARSE_BLOCK = 1 << 20  # elements of one dense block of a sparse gradient (4 MiB fp32)
    MASTER_CHUNK = 1 << 20  # elements of one chunk of a large low-precision parameter's step

    def __init__(self, params, *, max_grad_norm: float, **kwargs) -> None:
        self._untouched: dict[torch.Tensor, set[int]] = {}
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self._global_grad_norm: torch.Tensor | None = None
        # AdamW makes its state at the first step, between that step's transient buffers, where
        # the moments then pin the freed transients in the heap; made now, they lie below.
        if self.defaults.get("fused"):  # (an unfused step wants its step count on the CPU)
            for group in self.param_groups:
                for p in group["params"]:
                    self._init_state(p)

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:  # AdamW's own layout (fused: a float32 step on the parameter's device)
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
            if _low_precision(p):
                state["master"] = p.detach().to(torch.float32, copy=True)
            like = state.get("master", p)
            state["exp_avg"] = _zero_pages_like(like)
            state["exp_avg_sq"] = _zero_pages_like(like)
            self._untouched[p] = set(range(self._blocks(p)))  # rows whose state is still 0
        return state

    def _blocks(self, p: torch.Tensor) -> int:
        return -(-p.shape[0] // self._block_rows(p)) if p.dim() else 1

    def _block_rows(self, p: torch.Tensor) -> int:
        return max(1, self.SPARSE_BLOCK // max(1, p[0].numel())) if p.dim() else 1

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._untouched.clear()  # a loaded state may be non-zero anywhere
        # torch casts loaded state to its parameter's dtype: a bf16 parameter's float32 master
        # and moments would come back rounded, so they are taken from the saved tensors again
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params, strict=True):
            saved = state_dict["state"].get(i, {})
            if _low_precision(p) and "master" in saved:
                for key in ("master", "exp_avg", "exp_avg_sq"):
                    self.state[p][key] = saved[key].to(p.device, torch.float32, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        sparse = {p: p.grad.coalesce() for p in params if p.grad.is_sparse}
        grads = [sparse[p].values() if p in sparse else p.grad for p in params]
        coef = 1.0
        self.nonfinite = False
        if grads:
            norm = self._global_norm(grads)
            self._global_grad_norm = norm
            if not math.isfinite(float(norm)):  # a NaN/inf gradient: no update from it
                self.nonfinite = True
                return None
            if self.max_grad_norm > 0:
                coef = min(1.0, self.max_grad_norm / (float(norm) + 1e-6))
        aside = {p: p.grad for p in params if p in sparse or _low_precision(p)}
        for p in params:
            if p in aside:
                p.grad = None  # the dense step below skips parameters without a gradient
            else:
                self._untouched.pop(p, None)  # the dense step writes all of its state
        try:
            dense = [g for p, g in zip(params, grads, strict=True) if p not in aside]
            loss = self._dense_step(closure, dense, coef)
        finally:
            for p, grad in aside.items():
                p.grad = grad
        for group in self.param_groups:
            low = [p for p in group["params"] if p in aside and p not in sparse]
            if low:
                self._master_step(low, group, coef)
            for p in group["params"]:
                if p in sparse:
                    self._sparse_rows_step(p, sparse[p], group, coef)
        return loss

    def _global_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The float32 2-norm of all ``grads``. A large low-precision gradient is normed by
        chunks widened into one reused buffer: ``_foreach_norm(..., dtype=float32)`` widens
        each whole tensor into a fresh float32 copy first (at vocab 128k a 131 MB copy, first-
        touched every step: about 35 of the 62-68 ms of the bf16 optimizer step on the Zen 4
        VM)."""
        small, big = [], []
        for g in grads:
            chunked = _low_precision(g) and g.is_contiguous() and g.numel() > self.MASTER_CHUNK
            (big if chunked else small).append(g)
        norms = list(torch._foreach_norm(small, 2.0, dtype=torch.float32)) if small else []
        buf = None
        for g in big:
            flat = g.view(-1)
            if buf is None:
                buf = torch.empty(self.MASTER_CHUNK, dtype=torch.float32, device=g.device)
            for a in range(0, flat.numel(), self.MASTER_CHUNK):
                chunk = flat[a : a + self.MASTER_CHUNK]
                norms.append(torch.linalg.vector_norm(buf[: chunk.numel()].copy_(chunk)))
        return torch.linalg.vector_norm(torch.stack(norms))

    def _master_step(self, params: list[torch.Tensor], group: dict, coef: float) -> None:
        """AdamW on the float32 masters of low-precision ``params``, then the parameters
        rounded from them (gradients widened to float32 for the update, left as they were)."""
        if group["amsgrad"] or group["maximize"] or not group["fused"]:
            raise ValueError(
                "ClippedAdamW: a bfloat16/float16 parameter needs fused=True and amsgrad/"
                "maximize off"
            )
        states = [self._init_state(p) for p in params]
        for p in params:
            self._untouched.pop(p, None)
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        kw = _fused_kw(group)
        # Large parameters (an lm_head or embedding) go by chunks: each chunk's gradient is
        # widened into one reused float32 buffer, updated and rounded back while it is in cache,
        # instead of widening the whole gradient into a fresh tensor (131 MB at vocab 128k,
        # first-touched every step). The same elementwise update, so the same result.
        chunked, whole = [], []
        for p, s in zip(params, states, strict=True):
            (chunked if _chunkable(p, s) else whole).append((p, s))
        buf = None
        for p, s in chunked:
            flat = [t.view(-1) for t in (p, p.grad, s["master"], s["exp_avg"], s["exp_avg_sq"])]
            n = flat[0].numel()
            if buf is None:
                buf = torch.empty(self.MASTER_CHUNK, dtype=torch.float32, device=p.device)
            for a in range(0, n, self.MASTER_CHUNK):
                b = min(a + self.MASTER_CHUNK, n)
                p_c, g_c, master_c, m_c, v_c = (t[a:b] for t in flat)
                g32 = buf[: b - a].copy_(g_c)
                if coef < 1.0:
                    g32.mul_(coef)
                torch._fused_adamw_([master_c], [g32], [m_c], [v_c], [], [s["step"]], **kw)
                p_c.copy_(master_c)
        if not whole:
            return
        params, states = [p for p, _ in whole], [s for _, s in whole]
        steps = [s["step"] for s in states]
        masters = [s["master"] for s in states]
        grads = [p.grad.to(torch.float32) for p in params]
        if coef < 1.0:
            torch._foreach_mul_(grads, coef)
        m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._fused_adamw_(masters, grads, m, v, [], steps, **kw)
        torch._foreach_copy_(params, masters)

    def _dense_step(self, closure, grads: list[torch.Tensor], coef: float):
        if coef >= 1.0 or not grads:
            return super().step(closure)
        if not self.defaults.get("fused"):
            torch._foreach_mul_(grads, coef)
            return super().step(closure)
        self.grad_scale = torch.tensor(1.0 / coef, device=grads[0].device)
        try:
            return super().step(closure)
        finally:
            del self.grad_scale

    def _sparse_rows_step(self, p: torch.Tensor, grad: torch.Tensor, group: dict, coef: float):
        if grad.sparse_dim() != 1 or group["amsgrad"] or group["maximize"] or not group["fused"]:
            raise ValueError(
                "ClippedAdamW: a sparse gradient must be row-sparse (nn.Embedding(sparse=True)), "
                "with fused=True and amsgrad/maximize off"
            )
        state = self._init_state(p)
        state["step"] += 1
        rows, values = grad.indices()[0], grad.values()  # coalesced: rows sorted, unique
        if "master" in state:
            values = values.float()
        if coef < 1.0:
            values = values * coef
        m, v = state["exp_avg"], state["exp_avg_sq"]
        block = self._block_rows(p)
        bounds = torch.searchsorted(
            rows, torch.arange(0, p.shape[0] + block, block, device=p.device)
        ).tolist()
        # A block that has never had a gradient row has m = v = 0, so without weight decay its
        # update is exactly zero: skipping it changes nothing and leaves its pages untouched
        # (rows no batch uses then cost no memory: see _zero_pages_like).
        untouched, skip = self._untouched.get(p, set()), group["weight_decay"] == 0
        for i, r0 in enumerate(range(0, p.shape[0], block)):
            lo, hi = bounds[i], bounds[i + 1]
            if hi > lo:
                untouched.discard(i)
            elif skip and i in untouched:
                continue
            r1 = min(p.shape[0], r0 + block)
            target = state.get("master", p)[r0:r1]  # a bf16 table steps its fp32 master's rows
            dense = target.new_zeros((r1 - r0, *p.shape[1:]))
            if hi > lo:
                dense.index_copy_(0, rows[lo:hi] - r0, values[lo:hi])
            args = ([target], [dense], [m[r0:r1]], [v[r0:r1]], [], [state["step"]])
            torch._fused_adamw_(*args, **_fused_kw(group))
            if "master" in state:
                p[r0:r1].copy_(target)


def _fused_kw(group: dict) -> dict:
    """``torch._fused_adamw_``'s hyperparameters from a param group."""
    return dict(lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                maximize=False)  # fmt: skip


def _low_precision(p: torch.Tensor) -> bool:
    return p.dtype in (torch.bfloat16, torch.float16)


def _zero_pages_like(p: torch.Tensor) -> torch.Tensor:
    """``torch.zeros_like(p)``; on the CPU from a fresh anonymous mapping, whose pages the kernel
    supplies (zeroed) only when first written, so state that stays zero takes no memory.

    ``torch.zeros`` writes every byte up front; the optimizer state of an embedding whose rows
    mostly never meet a batch would then be resident in full for nothing.
    """
    if p.device.type != "cpu" or not p.is_contiguous() or p.numel() == 0:
        return torch.zeros_like(p, memory_format=torch.preserve_format)
    buf = mmap.mmap(-1, p.numel() * p.element_size(), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buf, dtype=p.dtype).view(p.shape)  # the tensor keeps buf alive


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Join (or create) the process group; returns ``(rank, world_size)``."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:  # a single process started without a launcher
            os.environ.update(
                RANK="0",
                LOCAL_RANK="0",
                WORLD_SIZE="1",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()),
            )
        if torch.cuda.is_available():  # before the group exists, so nccl binds the right GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        with _captured_output():  # DeepSpeed builds/loads its CPU shm op and says so each run
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


@contextlib.contextmanager
def _captured_output():
    """Hold back what C/C++ and Python write to stdout/stderr inside the block (file
    descriptors 1 and 2); replay it to stderr only if the block fails."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def quiet_libraries(progress: bool) -> None:
    """No Hugging Face progress bars (weights loading, shard writing) under --no-progress."""
    if not progress:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by processes and libraries later
        import transformers

        transformers.utils.logging.disable_progress_bar()
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except ImportError:
            pass


def shutdown_distributed() -> None:
    """Leave the process group so that a later :func:`init_distributed` in this process starts
    afresh (DeepSpeed's cached groups are released with it)."""
    if torch.distributed.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: ``--deepspeed`` file with its ``"auto"`` values filled from flags,
    or one built from the flags."""
    from_flags: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "bf16": {"enabled": cfg.bf16},
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.offload:
        zero = from_flags["zero_optimization"]
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    if cfg.deepspeed is None:
        return from_flags
    try:
        with open(cfg.deepspeed) as f:
            ds = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--deepspeed {cfg.deepspeed}: cannot read a JSON config ({e})") from e

    def fill(node: Any, default: Any) -> Any:
        if node == "auto":
            return default
        if isinstance(node, dict) and isinstance(default, dict):
            return {k: fill(v, default.get(k)) for k, v in node.items()}
        return node

    ds = fill(ds, from_flags)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "steps_per_print"):
        ds.setdefault(key, from_flags[key])
    ds.pop("train_batch_size", None)  # DeepSpeed derives it; a stale value would only conflict
    return ds


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warmup from 0 over ``warmup_ratio`` of the steps, then cosine/linear to 0."""
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _plain_step(ds: dict[str, Any]) -> bool:
    """ZeRO-0 without fp16/autocast: DeepSpeed steps our optimizer on the full gradients
    (averaged over ranks in backward, so every rank sees the same norm). Under bf16 they are
    the bf16 model's own, and ClippedAdamW keeps the float32 master weights itself."""
    zero = ds.get("zero_optimization", {}).get("stage", 0)
    half = any(ds.get(k, {}).get("enabled", False) for k in ("fp16", "torch_autocast"))
    return zero == 0 and not half


def make_engine(
    model: nn.Module, ds: dict[str, Any], cfg: TrainConfig, lr: float, total_steps: int
):
    """``deepspeed.initialize`` with AdamW and our schedule unless the JSON config names its own."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = scheduler = None
    if "optimizer" not in ds:
        # The fused AdamW updates every tensor in one pass (CPU and CUDA); the default per-tensor
        # loop cost 14% of a step on the tiny CPU model (py-spy, bench/bench_train.py).
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        kwargs = dict(lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=fused)
        if _plain_step(ds):
            # DeepSpeed would clip ZeRO-0 gradients with a norm and a multiply per tensor
            # before the step; the optimizer does both in its fused pass instead. Under bf16
            # (the model already in bf16) DeepSpeed's own bf16 wrapper is left out: the
            # optimizer keeps the float32 masters in one fused pass where the wrapper took 4x.
            clip = float(ds.get("gradient_clipping", 0.0) or 0.0)
            if ds.get("bf16", {}).get("enabled", False):
                # what DeepSpeed's bf16 mode would do (the families load bf16 already): the
                # parameters only, buffers such as RoPE's inv_freq stay float32
                for p in model.parameters():
                    if p.dtype == torch.float32:
                        p.data = p.data.to(torch.bfloat16)
            ds = {**ds, "gradient_clipping": 0.0, "bf16": {"enabled": False}}
            optimizer = ClippedAdamW(params, max_grad_norm=clip, **kwargs)
        else:
            optimizer = torch.optim.AdamW(params, **kwargs)
    if "scheduler" not in ds and optimizer is not None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=params if optimizer is None else None,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds,
    )
    if cfg.zero_stage == 0 and engine.world_size == 1:
        # Alone, there is nothing to reduce, yet DeepSpeed still flattens and copies every
        # gradient for its all-reduce (5% of a CPU step); ZeRO stages reduce in their own hooks.
        engine.enable_backward_allreduce = False
    return engine, scheduler


def sparse_embedding_gradients(hf_model: nn.Module, engine) -> bool:
    """Switch the input embedding to row-sparse gradients where nothing else is affected.

    A batch touches a few hundred rows of a ``[V, D]`` table, yet the dense gradient is the
    whole table (33 MB at V=32000, D=256, written and read every step). ClippedAdamW applies
    the sparse form exactly; it is used when it is the optimizer, alone (no all-reduce of
    gradients to rewrite) and the table is not tied to the lm_head (whose fused gradient is
    dense anyway). Returns whether it was switched.
    """
    emb = hf_model.get_input_embeddings()
    out = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
    ok = (
        isinstance(engine.optimizer, ClippedAdamW)
        and engine.optimizer.defaults.get("fused")
        and engine.world_size == 1
        and isinstance(emb, nn.Embedding)
        and emb.weight.requires_grad
        and (out is None or out.weight is not emb.weight)
    )
    if ok:
        emb.sparse = True
    return bool(ok)
