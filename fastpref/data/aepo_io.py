"""Files of the AEPO tools: responses in (one prompt + N responses per row), preference data out.

Input (``fastpref-aepo``'s, and what ``fastpref-sample`` writes): a local .jsonl, .json, .csv or
.parquet file, or a hub dataset name ("owner/name" or "owner/name:split", online only). One
column is the prompt: ``prompt`` or ``instruction`` (or the one named by ``prompt_column``);
the responses are either one ``responses`` column holding a list (JSON text in a CSV cell), or
else **every other column**, in file order. The prompt column is never a candidate.

Row policy (:func:`read_instructions`):

- a missing or empty prompt, a response cell that is not text, or a column without a name is a
  :class:`~fastpref.errors.DataError` naming ``file:line:column`` (line: the 1-based line of a
  JSONL or CSV file, counting the CSV header; row number for Parquet, JSON and hub data);
- empty responses (empty or whitespace-only text, an empty CSV cell, null) and exact duplicates
  of an earlier response in the same row are dropped, and counted;
- the first ``num_responses`` responses left are the row's candidates. A row with fewer is a
  DataError, or (``skip_short=True``) skipped and counted.

Output (:class:`PreferenceWriter`): the rows ``fastpref-train --loss dpo|lipo --data`` reads,
JSONL, CSV or Parquet by the output's extension. Finished rows go first to a journal beside the
output (``<output>.partial``: a settings header, then one JSON line per row, each appended in one
``write`` and fsync'd); a run killed at any point and re-run with the same output and settings
continues after the last complete row and never recomputes or rewrites a finished one. When every
row is done, the output is written from the journal to a temporary file and renamed into place,
so the output file either does not exist or is complete.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastpref.data.rows import loads_json
from fastpref.errors import ConfigError, DataError
from fastpref.paths import looks_local

__all__ = [
    "OUTPUT_SUFFIXES",
    "PROMPT_COLUMNS",
    "Instruction",
    "Instructions",
    "PreferenceWriter",
    "check_output_path",
    "list_row",
    "pair_row",
    "read_instructions",
    "read_prompts",
    "read_table",
    "write_rows",
]

PROMPT_COLUMNS = ("prompt", "instruction")
RESPONSES_COLUMN = "responses"
INPUT_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
OUTPUT_SUFFIXES = (".jsonl", ".csv", ".parquet")
_JOURNAL_VERSION = 1


@dataclass(frozen=True)
class Instruction:
    """One usable row: its prompt, its N candidate responses and where it came from."""

    prompt: str
    responses: tuple[str, ...]
    where: str  # "file:line"


@dataclass
class Instructions:
    """The usable rows, in file order, and what the row policy dropped on the way."""

    rows: list[Instruction] = field(default_factory=list)
    empty: int = 0  # empty responses dropped
    duplicate: int = 0  # duplicate responses dropped
    short: int = 0  # rows skipped for having fewer than N responses (skip_short=True)
    first_short: str = ""  # where the first of them is

    def summary(self, num_responses: int) -> str:
        """One line of what the policy did ("" when it did nothing)."""
        parts = []
        if self.empty:
            parts.append(f"dropped {self.empty} empty responses")
        if self.duplicate:
            parts.append(f"dropped {self.duplicate} duplicate responses")
        if self.short:
            parts.append(
                f"skipped {self.short} rows with fewer than {num_responses} distinct non-empty "
                f"responses (first: {self.first_short})"
            )
        return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Reading


def _text(path: Path, data: bytes) -> str:
    """``data`` as UTF-8 text without a byte-order mark (DataError naming the line if not)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None


def _read_jsonl(path: Path) -> tuple[list[str], list[tuple[int, Any]]]:
    return _jsonl_records(path, _text(path, path.read_bytes()))


def _jsonl_records(path: Path, text: str) -> tuple[list[str], list[tuple[int, Any]]]:
    records, columns = [], {}
    for lineno, line in enumerate(io.StringIO(text, newline=None), start=1):  # as open() splits
        if line.strip():
            try:
                record = loads_json(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}:{e.colno}: not valid JSON ({e.msg})") from None
            if isinstance(record, dict):
                columns.update(dict.fromkeys(record))
            records.append((lineno, record))
    return list(columns), records


def _read_json(path: Path) -> tuple[list[str], list[tuple[int, Any]]]:
    text = _text(path, path.read_bytes())
    try:
        obj = loads_json(text)
    except json.JSONDecodeError:
        return _jsonl_records(path, text)  # JSON Lines saved as .json
    if not isinstance(obj, list):
        raise DataError(f"{path}:1:1: expected a list of rows, got {type(obj).__name__}")
    columns = {k: None for r in obj if isinstance(r, dict) for k in r}
    return list(columns), list(enumerate(obj, start=1))


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, Any]]]:
    # The csv module (not `datasets`) so every cell stays text and each row keeps its line.
    text = _text(path, path.read_bytes())
    limit = csv.field_size_limit(sys.maxsize)  # a long response is no error (default: 128 KiB)
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] = []
    records, start = [], 1
    try:
        header = next(reader, [])
        start = reader.line_num + 1
        for cells in reader:
            if any(c.strip() for c in cells):
                if len(cells) != len(header):
                    raise DataError(
                        f"{path}:{start}:{len(cells)}: {len(cells)} cells, but the header has "
                        f"{len(header)} columns"
                    )
                records.append((start, dict(zip(header, cells, strict=True))))
            start = reader.line_num + 1
    except csv.Error as e:  # e.g. a quoted cell the end of the file cuts off
        raise DataError(f"{path}:{start}: not valid CSV ({e})") from None
    finally:
        csv.field_size_limit(limit)
    return header, records


def _read_parquet(path: Path) -> tuple[list[str], list[tuple[int, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:  # not Parquet, truncated, corrupt
        raise DataError(f"{path}: cannot read it as Parquet ({type(e).__name__}: {e})") from None
    return list(table.column_names), list(enumerate(table.to_pylist(), start=1))


def _read_hub(name: str) -> tuple[list[str], list[tuple[int, Any]]]:
    import datasets

    repo, _, split = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, split=split or "train")
    except Exception as e:  # noqa: BLE001 - offline, unknown name, bad split: all the user's input
        raise DataError(
            f"{name}: not a local file, and loading it as a hub dataset failed "
            f"({type(e).__name__}: {e})"
        ) from e
    return list(ds.column_names), list(enumerate(ds, start=1))


def read_table(source: str) -> tuple[list[str], list[tuple[int, Any]]]:
    """``(column names in file order, [(line or row number, record), ...])`` of ``source``."""
    path = Path(os.path.expanduser(source))
    suffix = path.suffix.lower()
    if path.is_file():
        readers = {
            ".jsonl": _read_jsonl,
            ".json": _read_json,
            ".csv": _read_csv,
            ".parquet": _read_parquet,
        }
        if suffix not in readers:
            raise DataError(f"{source}: unsupported file type; use one of {INPUT_SUFFIXES}")
        return readers[suffix](path)
    if path.exists():
        raise DataError(f"{source}: not a file")
    if looks_local(source):
        raise DataError(f"{source}: file not found")
    return _read_hub(source)


def _prompt_column(source: str, columns: Sequence[str], prompt_column: str | None) -> str:
    if prompt_column is not None:
        if prompt_column not in columns:
            raise DataError(f"{source}:1: no column {prompt_column!r} (columns: {list(columns)})")
        return prompt_column
    found = [c for c in PROMPT_COLUMNS if c in columns]
    if not found:
        raise DataError(
            f"{source}:1: no prompt column: expected one named 'prompt' or 'instruction' "
            f"(columns: {list(columns)}); or name it with --prompt-column"
        )
    if len(found) > 1:
        raise DataError(
            f"{source}:1: both 'prompt' and 'instruction' columns; say which is the prompt with "
            "--prompt-column (the other would be taken as a response)"
        )
    return found[0]


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _prompt_text(record: dict, column: str, where: str) -> str:
    value = record.get(column)
    if _is_empty(value):
        raise DataError(f"{where}:{column}: the prompt is empty or missing")
    if not isinstance(value, str):
        raise DataError(f"{where}:{column}: the prompt must be text, got {type(value).__name__}")
    return value


def _cells(record: dict, columns: Sequence[str], prompt: str, where: str, from_csv: bool):
    """``[(column label, value), ...]``: the row's responses in order, prompt excluded."""
    if RESPONSES_COLUMN in columns:
        value = record.get(RESPONSES_COLUMN)
        if from_csv and isinstance(value, str):
            try:
                value = loads_json(value) if value.strip() else []
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}:{RESPONSES_COLUMN}: a CSV 'responses' cell must be a JSON list "
                    f"of texts ({e.msg})"
                ) from None
        if value is None:
            value = []
        if not isinstance(value, list | tuple):
            raise DataError(
                f"{where}:{RESPONSES_COLUMN}: expected a list of texts, got {type(value).__name__}"
            )
        return [(f"{RESPONSES_COLUMN}[{i}]", v) for i, v in enumerate(value)]
    out = []
    for i, c in enumerate(columns, start=1):
        if c == prompt:
            continue
        if not str(c).strip():
            raise DataError(
                f"{where}:{i}: column {i} has no name (an index column written by pandas?); "
                "every column but the prompt is taken as a response"
            )
        out.append((c, record.get(c)))
    return out


def read_instructions(
    source: str,
    num_responses: int | None,
    *,
    num_instructions: int | None = None,
    prompt_column: str | None = None,
    skip_short: bool = False,
) -> tuple[Instructions, int]:
    """The first ``num_instructions`` usable rows of ``source`` (all when None) and N.

    ``num_responses=None`` takes N from the first row (its number of distinct non-empty
    responses). Returns ``(instructions, N)``; the row policy is in the module docstring.
    """
    columns, records = read_table(source)
    if not records:
        raise DataError(f"{source}: no rows")
    prompt = _prompt_column(source, columns, prompt_column)
    from_csv = str(source).lower().endswith(".csv")
    out = Instructions()
    n = num_responses
    for pos, record in records:
        if num_instructions is not None and len(out.rows) >= num_instructions:
            break
        where = f"{source}:{pos}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with named fields")
        text = _prompt_text(record, prompt, where)
        seen: set[str] = set()
        kept: list[str] = []
        for label, value in _cells(record, columns, prompt, where, from_csv):
            if _is_empty(value):
                out.empty += 1
                continue
            if not isinstance(value, str):
                raise DataError(
                    f"{where}:{label}: a response must be text, got {type(value).__name__} "
                    f"{value!r:.60} (every column but {prompt!r} is taken as a response)"
                )
            if value in seen:
                out.duplicate += 1
                continue
            seen.add(value)
            kept.append(value)
        if n is None:
            n = len(kept)
        if len(kept) < n:
            if not skip_short:
                raise DataError(
                    f"{where}: {len(kept)} distinct non-empty responses, fewer than "
                    f"--num-responses {n} (lower it, or pass --skip-short-rows to skip such rows)"
                )
            out.short += 1
            out.first_short = out.first_short or where
            continue
        out.rows.append(Instruction(text, tuple(kept[:n]), where))
    if n is None or n < 1:
        raise DataError(f"{source}: the first row has no responses")
    return out, n


def read_prompts(source: str, *, prompt_column: str | None = None, limit: int | None = None):
    """The prompts of ``source`` (a prompt column as in :func:`read_instructions`; other
    columns ignored), in file order, at most ``limit``."""
    columns, records = read_table(source)
    if not records:
        raise DataError(f"{source}: no rows")
    column = _prompt_column(source, columns, prompt_column)
    prompts = []
    for pos, record in records[:limit]:
        if not isinstance(record, dict):
            raise DataError(f"{source}:{pos}: expected an object with named fields")
        prompts.append(_prompt_text(record, column, f"{source}:{pos}"))
    return prompts


# ---------------------------------------------------------------------------------------------
# Writing


def pair_row(prompt: str, responses: Sequence[str], scores: Sequence[float]) -> dict:
    """The best and the worst response by reward (ties: the earlier one is chosen)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable
    best, worst = order[0], order[-1]
    return {
        "prompt": prompt,
        "chosen": responses[best],
        "rejected": responses[worst],
        "chosen_reward": float(scores[best]),
        "rejected_reward": float(scores[worst]),
    }


def list_row(prompt: str, responses: Sequence[str], scores: Sequence[float]) -> dict:
    """All responses in descending reward order (a stable sort: ties keep their order)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return {
        "prompt": prompt,
        "responses": [responses[i] for i in order],
        "scores": [float(scores[i]) for i in order],
    }


def check_output_path(path: str | os.PathLike) -> Path:
    out = Path(path)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(
            f"-o {path}: unsupported output type {out.suffix!r}; use one of {OUTPUT_SUFFIXES}"
        )
    return out


def write_rows(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write ``rows`` to ``path`` (JSONL, CSV with list cells as JSON text, or Parquet) through
    a temporary file renamed into place, so ``path`` is never half-written."""
    out = check_output_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    tmp = out.with_name(out.name + ".tmp")
    suffix = out.suffix.lower()
    if suffix == ".jsonl":
        with tmp.open("w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif suffix == ".csv":
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with tmp.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in rows:
                writer.writerow(
                    {k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()}
                )
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, out)


class PreferenceWriter:
    """Append finished rows to ``<output>.partial`` and, at :meth:`finish`, write the output.

    ``settings`` (JSON-able) is the journal's header: a journal made with other settings is a
    :class:`ConfigError` (unless ``overwrite``), so a resumed run never mixes two configurations.
    """

    def __init__(self, output: str | os.PathLike, settings: dict, *, overwrite: bool = False):
        self.output = check_output_path(output)
        self.journal = self.output.with_name(self.output.name + ".partial")
        self.settings = json.loads(json.dumps(settings))  # as it reads back
        self.done: list[dict] = []
        if overwrite:
            self.output.unlink(missing_ok=True)
            self.journal.unlink(missing_ok=True)
        self.complete = self.output.exists() and not self.journal.exists()
        if not self.complete and self.journal.exists():
            self._resume()

    def _resume(self) -> None:
        data = self.journal.read_bytes()
        end = data.rfind(b"\n") + 1  # a row cut off by a kill has no newline: drop it
        lines = data[:end].decode("utf-8").splitlines()
        if not lines:
            self.journal.unlink()
            return
        header = json.loads(lines[0])
        if header.get("fastpref_aepo") != _JOURNAL_VERSION:
            raise ConfigError(f"{self.journal}: not a fastpref-aepo journal; remove it")
        theirs = header.get("settings", {})
        changed = sorted(
            k for k in set(theirs) | set(self.settings) if theirs.get(k) != self.settings.get(k)
        )
        if changed:
            diff = ", ".join(f"{k}: {theirs.get(k)!r} -> {self.settings.get(k)!r}" for k in changed)
            raise ConfigError(
                f"{self.journal}: an unfinished run with other settings ({diff}); re-run with "
                "its settings to continue it, or pass --overwrite to start over"
            )
        self.done = [json.loads(line) for line in lines[1:]]
        if end != len(data):
            with self.journal.open("r+b") as f:
                f.truncate(end)

    def append(self, rows: Sequence[dict]) -> None:
        """Journal ``rows`` (one write, then fsync)."""
        if not rows:
            return
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if not self.journal.exists():
            self.output.parent.mkdir(parents=True, exist_ok=True)
            header = {"fastpref_aepo": _JOURNAL_VERSION, "settings": self.settings}
            text = json.dumps(header, ensure_ascii=False) + "\n" + text
        with self.journal.open("a", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        self.done.extend(json.loads(json.dumps(rows)))

    def finish(self) -> None:
        """Write the output from every journaled row, then remove the journal."""
        write_rows(self.output, self.done)
        self.journal.unlink(missing_ok=True)
        self.complete = True
