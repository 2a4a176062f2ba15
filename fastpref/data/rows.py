"""Reading rows from files and checking their fields, for any family's formats.

``read_records(source)`` turns a local .jsonl/.json/.csv/.parquet file (or a hub dataset name)
into ``(position, record)`` pairs, where the position is a 1-based line (JSONL) or row; a family
validates each record through a :class:`Row`, which turns every problem into a
:class:`~fastpref.errors.DataError` naming the file, the line and the field.

Text fields are strings or chat messages (a list of {"role", "content"}); CSV cells that hold
lists (responses, scores, chat messages) are JSON text.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fastpref.errors import DataError
from fastpref.paths import LOCAL_DATA_SUFFIXES, looks_local


def loads_json(text: str | bytes) -> Any:
    """``json.loads``, except that the two other errors it raises on hostile input are
    ``json.JSONDecodeError`` too (what every reader already reports as a DataError): nesting
    deeper than the parser's recursion limit (RecursionError) and an integer literal longer than
    ``sys.get_int_max_str_digits()`` (ValueError)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", str(text)[:1], 0) from None
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise json.JSONDecodeError(str(e).split(":")[0], str(text)[:1], 0) from None


# ---------------------------------------------------------------------------------------------
# Reading raw records: (position, record) pairs; position is a 1-based line (JSONL) or row.


def _read_jsonl(path: Path) -> tuple[str, list[tuple[int, Any]]]:
    records = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark is no data
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {lineno}: not UTF-8 text ({e.reason})") from None
            if not line.strip():
                continue
            try:
                records.append((lineno, loads_json(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
    return "line", records


def _read_json(path: Path) -> tuple[str, list[tuple[int, Any]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        obj = loads_json(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)  # JSON Lines saved as .json, as `datasets` also accepts
    if isinstance(obj, dict):  # {"data": [...]} — the one list-valued key holds the rows
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of rows or an object with one list of rows")
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a list of rows, got {type(obj).__name__}")
    return "row", list(enumerate(obj, start=1))


def _read_with_datasets(builder: str, path: Path) -> tuple[str, list[tuple[int, Any]]]:
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - Arrow's and the builder's errors name no row
        cause = e.__cause__ or e.__context__ or e
        raise DataError(
            f"{path}: cannot read it as {builder.upper()} ({type(cause).__name__}: "
            f"{str(cause).strip().splitlines()[-1] if str(cause).strip() else cause!r})"
        ) from e
    return "row", list(enumerate(ds, start=1))


def _read_hub(name: str) -> tuple[str, list[tuple[int, Any]]]:
    import datasets

    repo, _, split = name.partition(":")  # "owner/name:split", split defaults to train
    ds = datasets.load_dataset(repo, split=split or "train")
    return "row", list(enumerate(ds, start=1))


def read_records(source: str) -> tuple[str, list[tuple[int, Any]]]:
    """``(unit, [(position, record), ...])``: unit is "line" (JSONL) or "row"."""
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".jsonl":
            # Read with the json module rather than `datasets`: Arrow would coerce types across
            # rows and lose line numbers, and a bad row must be reported by its line.
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix in (".csv", ".parquet"):
            return _read_with_datasets(suffix[1:], path)
        raise DataError(
            f"{source}: unsupported file type; use one of {', '.join(LOCAL_DATA_SUFFIXES)}"
        )
    if path.exists():
        raise DataError(f"{source}: not a file; expected one of {', '.join(LOCAL_DATA_SUFFIXES)}")
    if looks_local(source):
        raise DataError(f"{source}: file not found")
    return _read_hub(source)


# ---------------------------------------------------------------------------------------------
# Validation


class Row:
    """Accessor for one raw record that turns every problem into a DataError naming it."""

    def __init__(
        self,
        record: Any,
        where: str,
        columns: dict[str, str],
        from_text: bool,
        list_fields: tuple[str, ...] = (),
    ):
        self.record, self.where, self.columns, self.from_text = record, where, columns, from_text
        self.list_fields = list_fields
        if not isinstance(record, dict):
            raise DataError(
                f"{where}: expected an object with named fields, got {type(record).__name__}"
            )

    def name(self, field: str) -> str:
        column = self.columns.get(field, field)
        return f"'{column}'" if column == field else f"'{column}' ({field})"

    def fail(self, field: str, problem: str) -> DataError:
        return DataError(f"{self.where}: field {self.name(field)} {problem}")

    def has(self, field: str) -> bool:
        return self.record.get(self.columns.get(field, field)) is not None

    def get(self, field: str) -> Any:
        value = self.record.get(self.columns.get(field, field))
        if value is None:
            raise self.fail(field, "is missing")
        if self.from_text and isinstance(value, str) and value.lstrip().startswith("["):
            # CSV cells hold lists (responses, scores, chat messages) as JSON text; a text cell
            # that merely looks like JSON stays text unless it is a list of chat messages.
            try:
                parsed = loads_json(value)
            except json.JSONDecodeError:
                return value
            if field in self.list_fields or _looks_like_chat(parsed):
                return parsed
        return value

    def text_or_chat(self, field: str) -> str | list[dict[str, str]]:
        value = self.get(field)
        if isinstance(value, str):
            return value
        return self.messages(field, value)

    def messages(self, field: str, value: Any) -> list[dict[str, str]]:
        if not isinstance(value, list) or not value:
            raise self.fail(
                field, f"must be a string or a list of chat messages, got {type_name(value)}"
            )
        out = []
        for m in value:
            ok = (
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
            )
            if not ok:
                raise self.fail(
                    field, 'has a chat message that is not {"role": str, "content": str}'
                )
            out.append({"role": m["role"], "content": m["content"]})
        return out

    def completion(self, field: str, value: Any | None = None) -> tuple[str, bool]:
        """(completion text, given as chat?)"""
        value = self.get(field) if value is None else value
        if isinstance(value, str):
            return value, False
        msgs = self.messages(field, value)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise self.fail(field, "given as chat messages must be one assistant message")
        return msgs[0]["content"], True

    def number(self, field: str) -> float:
        value = self.get(field)
        if self.from_text and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(field, f"must be a number, got {type_name(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            raise self.fail(field, f"is {str(value)[:20]}..., too large for a float") from None
        if math.isnan(number):
            raise self.fail(field, "must be a number, got NaN")
        return number

    def boolean(self, field: str) -> bool:
        """true/false, 1/0, or the strings "true"/"false"/"1"/"0" (any case), in any file."""
        value = self.get(field)
        if isinstance(value, str):
            value = {"true": True, "false": False, "1": True, "0": False}.get(
                value.strip().lower(), value
            )
        if isinstance(value, int | float) and not isinstance(value, bool) and value in (0, 1):
            value = bool(value)
        if not isinstance(value, bool):
            raise self.fail(field, f"must be true/false or 1/0, got {value!r:.60}")
        return value


def _looks_like_chat(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and "role" in m for m in value)
    )


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def load_records(
    source: str,
    validate: Callable[[Row], dict[str, Any]],
    *,
    columns: dict[str, str] | None = None,
    list_fields: tuple[str, ...] = (),
) -> list[dict]:
    """Read ``source`` and validate every record with ``validate(Row) -> canonical row``.

    ``source`` is a local .jsonl/.json/.csv/.parquet file or, when it is not a local path, a hub
    dataset name ("owner/name" or "owner/name:split"; needs the network). ``columns`` maps
    canonical field names to the file's column names, e.g. {"prompt": "question"};
    ``list_fields`` are the fields a CSV cell holds as JSON text. Raises DataError
    "FILE: line N: field 'F' ..." (JSONL) or "FILE: row N: ..." (others).
    """
    columns = dict(columns or {})
    unit, records = read_records(str(source))
    from_text = str(source).lower().endswith(".csv")
    rows = []
    for pos, record in records:
        rows.append(
            validate(Row(record, f"{source}: {unit} {pos}", columns, from_text, list_fields))
        )
    if not rows:
        raise DataError(f"{source}: no rows")
    return rows


def split_rows(rows: Sequence[dict], eval_fraction: float, seed: int) -> tuple[list, list]:
    """Shuffle-split into (train, eval); each keeps the original order of its rows.

    The eval part has round(len(rows) * eval_fraction) rows, at least 1 when the fraction is
    positive and there are two rows or more (and never all of them).
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(rows)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    train = [r for i, r in enumerate(rows) if i not in eval_idx]
    held = [r for i, r in enumerate(rows) if i in eval_idx]
    return train, held
