"""``fastpref-aepo``: preference data from N responses per instruction, annotating only k of them.

    fastpref-aepo                                   # embedded default (bundled responses + RM)
    fastpref-aepo responses.csv --num-responses 8 --num-annotations 2 --reward-model RM -o p.jsonl
    fastpref-aepo responses.csv --num-responses 8 --num-annotations 4 -o lipo.jsonl
    fastpref-aepo responses.csv --num-responses 8 --west-of-n -o pairs.jsonl

Per instruction: embed the N responses (sentence embeddings), pick k representative and diverse
ones (:mod:`fastpref.data.aepo`), score only those with the reward model, and write a pair
(k = 2, or ``--west-of-n``: best and worst of all N scored) or a ranked list (k > 2). The seed
tool's spellings (``--num_responses`` ...) are accepted too. With no ``--reward-model`` the
bundled tiny reward model is used: the embedded ``fastpref-train --loss rm`` run, trained on
first use and cached under ``--cache-dir``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fastpref.errors import ConfigError, InputError

PROG = "fastpref-aepo"
DEFAULT_OUTPUT = "preference.jsonl"
_CHUNK_TEXTS = 256  # responses embedded per chunk; rows are journaled after each chunk


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one (unset options say what unset means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from fastpref.data.aepo import DEFAULT_DIVERSITY_PENALTY, DEFAULT_RESTARTS, EXACT_LIMIT
    from fastpref.models.annotate import TEMPLATES
    from fastpref.models.encoder import POOLINGS

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Annotation-efficient preference data (AEPO, arXiv 2405.13541) and West-of-N.",
        formatter_class=_Defaults,
    )
    p.add_argument(
        "dataset",
        nargs="?",
        help="responses file (.jsonl/.json/.csv/.parquet) or hub name; a 'prompt' or "
        "'instruction' column, the rest responses (or one 'responses' list); "
        "unset: the bundled responses (16 per instruction)",
    )
    p.add_argument("-o", "--output", default=DEFAULT_OUTPUT, help="output .jsonl/.csv/.parquet")
    p.add_argument(
        "--num-responses", "--num_responses", type=int, help="N; unset: the first row's count"
    )
    p.add_argument(
        "--num-annotations",
        "--num_annotations",
        type=int,
        help="k responses scored per instruction (default 2; N with --west-of-n)",
    )
    p.add_argument(
        "--num-instructions", "--num_instructions", type=int, help="first m rows; unset: all"
    )
    p.add_argument(
        "--west-of-n",
        "--west_of_n",
        action="store_true",
        help="score all N, write the best and the worst as chosen/rejected",
    )
    p.add_argument(
        "--diversity-penalty",
        "--diversity_penalty",
        type=float,
        default=DEFAULT_DIVERSITY_PENALTY,
        help="λ of the objective",
    )
    p.add_argument(
        "--exact", action="store_true", help=f"enumerate every subset (C(N,k) <= {EXACT_LIMIT})"
    )
    p.add_argument(
        "--restarts", type=int, default=DEFAULT_RESTARTS, help="random local-search starts"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random starts")
    p.add_argument(
        "--embedding-model", help="sentence encoder path; unset: all-MiniLM-L6-v2 (bundled)"
    )
    p.add_argument("--pooling", choices=POOLINGS, default="mean", help="embedding pooling")
    p.add_argument("--embedding-batch-size", type=int, default=64, help="texts per encoder batch")
    p.add_argument(
        "--reward-model",
        "--reward_model",
        help="sequence-classification reward model path; unset: the bundled tiny RM",
    )
    p.add_argument(
        "--template",
        choices=TEMPLATES,
        default="auto",
        help="rendering of (prompt, response) for the RM: auto = chat when the tokenizer "
        "has a chat template",
    )
    p.add_argument("--batch-size", type=int, default=16, help="pairs per reward-model batch")
    p.add_argument("--max-length", type=int, default=512, help="tokens per scored pair")
    p.add_argument("--device", help="cuda, cuda:1, cpu; unset: cuda when available")
    p.add_argument("--prompt-column", help="the prompt column, when not 'prompt'/'instruction'")
    p.add_argument(
        "--skip-short-rows",
        action="store_true",
        help="skip (and count) rows with fewer than N distinct non-empty responses",
    )
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    p.add_argument(
        "--cache-dir",
        "--cache_dir",
        help="where the bundled RM is cached; unset: ~/.cache/fastpref",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except InputError as e:
        return _fail(str(e))


# ---------------------------------------------------------------------------------------------
# The bundled reward model: the embedded `fastpref-train --loss rm` run, trained on first use


def _assets_digest() -> str:
    from fastpref.paths import ASSETS

    # what the embedded rm run reads: the bundled pairs, tokenizer and tiny-Llama config
    files = [ASSETS / "data" / "pair_rationale.jsonl", ASSETS / "model" / "config.json"]
    files += sorted((ASSETS / "tokenizer").glob("*"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(ASSETS).as_posix().encode())
        h.update(f.read_bytes())
    import fastpref

    h.update(fastpref.__version__.encode())
    return h.hexdigest()[:16]


def bundled_reward_model(cache_dir: str | None = None, *, progress: bool = True) -> Path:
    """The bundled tiny RM: ``fastpref-train --loss rm`` with no data or model given (the
    bundled preference pairs, the tiny Llama), trained once and cached, keyed by the bundled
    assets and the fastpref version."""
    import fcntl
    import shutil

    root = Path(os.path.expanduser(cache_dir or "~/.cache/fastpref")) / "aepo"
    target = root / f"reward-model-{_assets_digest()}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with (root / "reward-model.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one training at a time; the others wait and reuse
        if (target / "config.json").is_file():
            return target
        from fastpref.cli.train import main as train

        run_dir = root / f"rm-run-{os.getpid()}"
        shutil.rmtree(run_dir, ignore_errors=True)
        print(
            f"{PROG}: training the bundled tiny reward model (fastpref-train --loss rm) once; "
            f"cached at {target}",
            flush=True,
        )
        argv = ["--loss", "rm", "--output-dir", str(run_dir), "--cache-dir", str(root / "ref")]
        code = train([*argv, *([] if progress else ["--no-progress"])])
        if code != 0 or not (run_dir / "model" / "config.json").is_file():
            raise InputError(
                f"training the bundled reward model failed (fastpref-train exit {code})"
            )
        os.replace(run_dir / "model", target)
        shutil.rmtree(run_dir, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# The run


def _subset_size(args: argparse.Namespace, n: int) -> int:
    from fastpref.data.aepo import EXACT_LIMIT, check_subset_size

    if args.west_of_n:
        if n < 2:
            raise ConfigError(f"--west-of-n needs at least 2 responses per row, got {n}")
        if args.num_annotations not in (None, n):
            raise ConfigError(
                f"--west-of-n scores all --num-responses {n}; --num-annotations "
                f"{args.num_annotations} contradicts it (drop it, or set it to {n})"
            )
        return n
    k = 2 if args.num_annotations is None else args.num_annotations
    check_subset_size(n, k)
    if args.exact and math.comb(n, k) > EXACT_LIMIT:
        raise ConfigError(
            f"--exact: C({n}, {k}) = {math.comb(n, k)} subsets is more than {EXACT_LIMIT}"
        )
    return k


def _check_args(args: argparse.Namespace) -> None:
    for name in ("num_responses", "num_instructions"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("batch_size", "embedding_batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if args.restarts < 0:
        raise ConfigError(f"--restarts must be at least 0, got {args.restarts}")


def _settings(args, source: str, n: int, k: int, embedding: str | None, reward: str) -> dict:
    def where(p: str | None) -> str | None:
        return str(Path(p).resolve()) if p and os.path.exists(p) else p

    return {
        "input": where(source),
        "num_responses": n,
        "num_annotations": k,
        "west_of_n": args.west_of_n,
        "diversity_penalty": args.diversity_penalty,
        "exact": args.exact,
        "restarts": args.restarts,
        "seed": args.seed,
        "embedding_model": where(embedding),
        "pooling": args.pooling,
        "reward_model": where(reward),
        "template": args.template,
        "max_length": args.max_length,
        "prompt_column": args.prompt_column,
        "skip_short_rows": args.skip_short_rows,
    }


def run(args: argparse.Namespace) -> int:
    from fastpref.data.aepo_io import PreferenceWriter, list_row, pair_row, read_instructions
    from fastpref.paths import bundled_data

    _check_args(args)
    start = time.perf_counter()
    source = args.dataset or str(bundled_data("aepo_responses.jsonl"))
    data, n = read_instructions(
        source,
        args.num_responses,
        num_instructions=args.num_instructions,
        prompt_column=args.prompt_column,
        skip_short=args.skip_short_rows,
    )
    k = _subset_size(args, n)
    rows = data.rows
    if args.num_instructions is not None and len(rows) < args.num_instructions:
        print(f"{PROG}: {source} has {len(rows)} usable instructions; using all of them")
    if note := data.summary(n):
        print(f"{PROG}: {note}")
    selecting = k < n
    embedding = args.embedding_model
    if selecting and embedding is None:
        from fastpref.models.encoder import default_embedding_model

        embedding = str(default_embedding_model())
    progress = not args.no_progress
    reward = args.reward_model
    if reward is None:
        reward = str(bundled_reward_model(args.cache_dir, progress=progress))
        if args.dataset:
            print(
                f"{PROG}: no --reward-model: scoring with the bundled tiny reward model, "
                "trained on fastpref's toy preference pairs only"
            )
    writer = PreferenceWriter(
        args.output,
        _settings(args, source, n, k, embedding if selecting else None, reward),
        overwrite=args.overwrite,
    )
    if writer.complete:
        print(
            f"{PROG}: {args.output} exists and is complete; nothing to do (--overwrite redoes it)"
        )
        return 0
    done = len(writer.done)
    if done > len(rows) or any(
        r["prompt"] != row.prompt for r, row in zip(writer.done, rows, strict=False)
    ):
        raise ConfigError(
            f"{writer.journal}: its {done} finished rows are not the first rows of {source} "
            "(was the input changed?); pass --overwrite to start over"
        )
    if done:
        print(f"{PROG}: resuming after {done} finished rows of {len(rows)}")
    todo = rows[done:]

    from fastpref.models.annotate import RewardAnnotator

    if not progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    annotator = RewardAnnotator(
        reward,
        device=args.device,
        template=args.template,
        max_length=args.max_length,
        batch_size=args.batch_size,
    )
    encoder = None
    if selecting and todo:
        from fastpref.models.encoder import Encoder

        encoder = Encoder(embedding, device=args.device, pooling=args.pooling)
    bars = _bars(len(todo), n, k, selecting, progress)
    times = {"embed": 0.0, "select": 0.0, "annotate": 0.0}
    per_chunk = max(1, _CHUNK_TEXTS // n)
    for c in range(0, len(todo), per_chunk):
        chunk = todo[c : c + per_chunk]
        picks = [tuple(range(n))] * len(chunk)
        if encoder is not None:
            picks = _select(encoder, chunk, k, args, bars, times)
        t = time.perf_counter()
        prompts = [row.prompt for row, idx in zip(chunk, picks, strict=True) for _ in idx]
        texts = [row.responses[i] for row, idx in zip(chunk, picks, strict=True) for i in idx]
        scores = annotator.score(prompts, texts, callback=bars["annotate"].update)
        times["annotate"] += time.perf_counter() - t
        out, pos = [], 0
        for row, idx in zip(chunk, picks, strict=True):
            picked = [row.responses[i] for i in idx]
            make = pair_row if (k == 2 or args.west_of_n) else list_row
            out.append(make(row.prompt, picked, scores[pos : pos + len(idx)]))
            pos += len(idx)
        writer.append(out)
    for bar in bars.values():
        bar.close()
    writer.finish()
    _report(args, writer, source, n, k, len(todo), done, annotator, times, start)
    return 0


def _bars(m: int, n: int, k: int, selecting: bool, progress: bool) -> dict:
    from tqdm.auto import tqdm

    off = not progress
    return {
        "embed": tqdm(
            total=m * n if selecting else 0,
            desc="embedding",
            unit="text",
            disable=off or not selecting,
        ),
        "annotate": tqdm(total=m * k, desc="annotating", unit="pair", disable=off),
    }


def _select(encoder, chunk, k: int, args, bars: dict, times: dict) -> list[tuple[int, ...]]:
    from fastpref.data.aepo import select_exact, select_subset, similarity_matrix

    t = time.perf_counter()
    texts = [r for row in chunk for r in row.responses]
    emb = encoder.encode(
        texts, batch_size=args.embedding_batch_size, callback=bars["embed"].update
    ).numpy()
    times["embed"] += time.perf_counter() - t
    t = time.perf_counter()
    n, picks = len(chunk[0].responses), []
    for i in range(len(chunk)):
        sim = similarity_matrix(emb[i * n : (i + 1) * n])
        if args.exact:
            picks.append(select_exact(sim, k, args.diversity_penalty).indices)
        else:
            sel = select_subset(
                sim, k, args.diversity_penalty, restarts=args.restarts, seed=args.seed
            )
            picks.append(sel.indices)
    times["select"] += time.perf_counter() - t
    return picks


def _report(args, writer, source, n, k, m, done, annotator, times, start) -> None:
    kind = "pairs" if (k == 2 or args.west_of_n) else f"ranked lists of {k}"
    method = "West-of-N" if args.west_of_n else ("all N ranked" if k == n else "AEPO")
    print(
        f"{PROG}: {method}: {len(writer.done)} {kind} from {source} (N={n}, k={k}) -> {args.output}"
    )
    calls, full = annotator.calls, n * m
    ratio = f"{full / calls:.1f}x fewer" if calls else "none needed"
    resumed = f"; {done} rows were already done" if done else ""
    print(
        f"{PROG}: reward-model calls: {calls} (k*m = {k}*{m}) against N*m = {full} to annotate "
        f"all N: {ratio}{resumed}"
    )
    print(
        f"{PROG}: time: embed {times['embed']:.1f} s, select {times['select']:.2f} s, annotate "
        f"{times['annotate']:.1f} s, total {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
