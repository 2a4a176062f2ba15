"""``fastpref-sample``: N sampled responses per prompt from a causal LM, for ``fastpref-aepo``.

    fastpref-sample --model runs/sft-.../model --data prompts.jsonl --num-responses 16 -o r.jsonl

Reads the prompts of ``--data`` (a ``prompt`` or ``instruction`` column; other columns are
ignored; unset: the bundled AEPO instructions' prompts), samples with ``generate`` in batches and
writes ``{prompt, responses: [...]}`` rows (JSONL, CSV or Parquet by the extension), the format
``fastpref-aepo`` reads. The output is written once, at the end, through a renamed temporary
file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from fastpref.errors import ConfigError, InputError, MissingPathError, ModelError

PROG = "fastpref-sample"


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one (unset options say what unset means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Sample N responses per prompt from a causal LM (input for fastpref-aepo).",
        formatter_class=_Defaults,
    )
    p.add_argument("--model", required=True, help="causal LM path (or hub name when online)")
    p.add_argument("--tokenizer", help="tokenizer path; unset: --model's")
    p.add_argument("--data", help="prompts file; unset: the bundled AEPO prompts")
    p.add_argument("--prompt-column", help="the prompt column, when not 'prompt'/'instruction'")
    p.add_argument("--num-prompts", type=int, help="first P prompts; unset: all")
    p.add_argument("-o", "--output", default="responses.jsonl", help="output .jsonl/.csv/.parquet")
    p.add_argument("--num-responses", "--num_responses", type=int, default=16, help="N")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per response")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument(
        "--template",
        choices=("plain", "chat"),
        default="plain",
        help="plain: BOS + prompt as fastpref-train renders text prompts; chat: chat template",
    )
    p.add_argument("--device", help="cuda, cpu; unset: cuda when available")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _load(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastpref.paths import looks_local

    loaded = []
    for flag, source in (("tokenizer", args.tokenizer or args.model), ("model", args.model)):
        local = looks_local(source)
        if local and not os.path.exists(os.path.expanduser(source)):
            raise MissingPathError(f"--{flag} {source!r} does not exist")
        kwargs = {"local_files_only": True} if local else {}
        cls = AutoTokenizer if flag == "tokenizer" else AutoModelForCausalLM
        try:
            loaded.append(cls.from_pretrained(source, **kwargs))
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(
                f"--{flag} {source!r}: cannot load it ({type(e).__name__}: {e})"
            ) from e
    tokenizer, model = loaded
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from fastpref.data.aepo_io import check_output_path, read_prompts, write_rows
    from fastpref.models.generate import sample_responses
    from fastpref.paths import bundled_data

    for name in ("num_responses", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise ConfigError("--num-prompts must be at least 1")
    if args.temperature <= 0:
        raise ConfigError(f"--temperature must be > 0 (this samples), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    check_output_path(args.output)
    source = args.data or str(bundled_data("aepo_responses.jsonl"))
    prompts = read_prompts(source, prompt_column=args.prompt_column, limit=args.num_prompts)
    if args.no_progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    model, tokenizer = _load(args)
    start = time.perf_counter()
    bar = tqdm(total=len(prompts), desc="sampling", unit="prompt", disable=args.no_progress)
    responses = sample_responses(
        model,
        tokenizer,
        prompts,
        num_responses=args.num_responses,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        template=args.template,
        callback=bar.update,
    )
    bar.close()
    rows = [{"prompt": p, "responses": r} for p, r in zip(prompts, responses, strict=True)]
    write_rows(args.output, rows)
    print(
        f"{PROG}: {len(rows)} prompts x {args.num_responses} responses -> {args.output} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
