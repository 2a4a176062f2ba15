"""Fuzzed data files and config files: the only outcomes are a successful load or an input error
that names the file (and, for a bad row, its line or row and field) — never another exception,
never a silent drop. Hypothesis is derandomized, so every run draws the same cases.
"""

from __future__ import annotations

import csv
import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastpref.errors import InputError
from fastpref.families.lm_formats import FIELDS, FORMATS, load_rows
from fastpref.train import parse_config

VALID = {
    "pair": {"prompt": "p", "chosen": "c", "rejected": "r"},
    "pair_rationale": {"prompt": "p", "chosen": "c", "rejected": "r", "rationale": "why"},
    "kto": {"prompt": "p", "completion": "c", "label": True},
    "list": {"prompt": "p", "responses": ["a", "b"], "scores": [1.0, 0.0]},
    "sft": {"prompt": "p", "completion": "c"},
}
JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=30)
    | st.just("x" * 100_000),  # a huge string
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
SETTINGS = settings(
    derandomize=True,
    max_examples=35,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@st.composite
def mutated_rows(draw, fmt: str):
    """Valid rows with fields dropped, replaced by junk, or junk fields added."""
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        row = dict(VALID[fmt])
        for field in FIELDS[fmt]:
            action = draw(st.sampled_from(["keep", "keep", "drop", "junk"]))
            if action == "drop":
                row.pop(field, None)
            elif action == "junk":
                row[field] = draw(JUNK)
        if draw(st.booleans()):
            row[draw(st.text(string.ascii_letters, min_size=1, max_size=6))] = draw(JUNK)
        rows.append(row if draw(st.integers(0, 9)) else draw(JUNK))  # now and then not a dict
    return rows


def _outcome(path, fmt):
    """Load, and check that an error names the file; returns the rows or None."""
    try:
        return load_rows(str(path), fmt)
    except InputError as e:
        assert str(path) in str(e), e
        return None


@pytest.mark.parametrize("fmt", FORMATS)
@SETTINGS
@given(data=st.data())
def test_fuzzed_jsonl_loads_or_names_file_line_field(tmp_path_factory, fmt, data):
    rows = data.draw(mutated_rows(fmt))
    path = tmp_path_factory.mktemp("fz") / "rows.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in rows)
    mutation = data.draw(st.sampled_from(["none", "bom", "truncate", "garbage_line", "latin1"]))
    raw = text.encode()
    if mutation == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif mutation == "truncate":
        raw = raw[: max(1, len(raw) - data.draw(st.integers(1, 5)))]
    elif mutation == "garbage_line":
        raw += b"{not json\n"
    elif mutation == "latin1":
        raw += '{"prompt": "caf\xe9"}\n'.encode("latin-1")
    path.write_bytes(raw)
    loaded = _outcome(path, fmt)
    if loaded is not None:  # nothing dropped silently: one row per non-blank line
        lines = [x for x in raw.decode("utf-8-sig").splitlines() if x.strip()]
        assert len(loaded) == len(lines)
    else:
        try:
            load_rows(str(path), fmt)
        except InputError as e:
            assert "line" in str(e) or "no rows" in str(e) or "columns" in str(e), e


@pytest.mark.parametrize("fmt", FORMATS)
@SETTINGS
@given(data=st.data())
def test_fuzzed_csv_and_parquet_load_or_name_the_file(tmp_path_factory, fmt, data):
    rows = [r for r in data.draw(mutated_rows(fmt)) if isinstance(r, dict)] or [VALID[fmt]]
    columns = sorted({k for r in rows for k in r})
    folder = tmp_path_factory.mktemp("fz")
    if data.draw(st.booleans()):
        path = folder / "rows.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            for r in rows:
                w.writerow(
                    {k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in r.items()}
                )
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "rows.parquet"
        as_text = {c: [json.dumps(r.get(c)) for r in rows] for c in columns}
        typed = data.draw(st.booleans())  # typed columns where Arrow can write them
        try:
            if not typed:
                raise TypeError
            pq.write_table(pa.table({c: pa.array([r.get(c) for r in rows]) for c in columns}), path)
        except (TypeError, OverflowError, pa.lib.ArrowException):
            pq.write_table(pa.table(as_text), path)
    loaded = _outcome(path, fmt)
    if loaded is not None:
        assert len(loaded) == len(rows)


OPTIONS = st.sampled_from(
    ["loss", "beta", "lr", "micro_batch", "max_length", "columns", "eval_fraction", "bf16",
     "zero_stage", "warmup_ratio", "nope", "max-steps", "seed", "scheduler"]
)  # fmt: skip


@SETTINGS
@given(config=st.dictionaries(OPTIONS, JUNK, max_size=5) | JUNK)
def test_fuzzed_config_files_parse_or_raise_a_config_error(tmp_path_factory, config):
    import yaml

    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    try:
        path.write_text(yaml.safe_dump(config))
    except (yaml.YAMLError, UnicodeEncodeError):
        return
    try:
        parse_config(["--config", str(path)])
    except InputError as e:
        assert str(path) in str(e) or str(e).startswith("--"), e
