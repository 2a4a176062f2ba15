"""Fuzzed data files of the embedding, reranker and AEPO formats (``test_fuzz_inputs.py`` does the
LM formats): the only outcomes are a load that accounts for every row (loaded, or for AEPO
skipped with a printed count) or an input error naming the file, the line/row and the field —
never another exception. Hypothesis is derandomized, so every run draws the same cases.
"""

from __future__ import annotations

import csv
import json
import re
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from test_fuzz_inputs import JUNK, SETTINGS

from fastpref.data.aepo_io import read_instructions
from fastpref.errors import InputError
from fastpref.families import embedding_formats as ef
from fastpref.families import reranker_formats as rf

HUGE = st.just("y" * 200_000)  # over the csv module's default field limit (131 072)
NESTED = st.integers(1, 3).map(lambda n: "[" * (20_000 * n) + "]" * (20_000 * n))
VALUES = JUNK | HUGE | st.just(10**400) | st.just(-0.0)

_USER = (
    "I will provide you with 2 passages, each indicated by an alphabetical identifier []. Rank "
    "the passages based on their relevance to the search query: q.\n[A] first\n[B] second\n"
    "Search Query: q.\nRank the 2 passages above."
)
VALID = {
    "triples": {"query": "q", "positives": ["p"], "negatives": ["n1", "n2"]},
    "sentence_transformers": {"anchor": "q", "positive": "p", "negative_1": "n", "negative": "m"},
    "columns": {"question": "q", "answer": "p", "neg_a": "n1", "neg_b": "n2"},
    "preference": {"query": "q", "passage1": "a", "passage2": "b", "preferred": "A"},
    "corpus": {"text": "a passage"},
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": "You are RankLLM"},
            {"from": "human", "value": _USER},
            {"from": "gpt", "value": "[B] > [A]"},
        ]
    },
    "chat": {
        "conversations": [
            {"role": "user", "content": _USER},
            {"role": "assistant", "content": "[A] > [B]"},
        ]
    },
    "ranked": {"query": "q", "passages": ["a", {"text": "b", "title": "t"}], "ranking": [1, 0]},
    "graded": {"qid": "7", "query": "q", "passages": ["a", "b", "c"], "relevance": [0, 2, 1]},
    "responses_list": {"prompt": "p", "responses": ["a", "b", "c"]},
    "responses_columns": {"instruction": "p", "r1": "a", "r2": "b", "r3": "c"},
}
EMBEDDING = ["triples", "sentence_transformers", "columns", "preference", "corpus"]
RERANKER = ["sharegpt", "chat", "ranked", "graded"]
AEPO = ["responses_list", "responses_columns"]
SUFFIXES = [".jsonl", ".json", ".csv", ".parquet"]
# No shrinking: a failure is reported as drawn (derandomized, so it reproduces), not after minutes
# of shrinking multi-kilobyte files.
FUZZ = settings(SETTINGS, phases=[Phase.explicit, Phase.generate])
WHERE = re.compile(r"(line|row) \d+|:\d+")  # a row's position in the message
WHOLE_FILE = ("no rows", "JSON array", "list of rows", "not UTF-8", "cannot read", "no prompt",
              "no column", "columns", "first row", "Parquet", "field limit")  # fmt: skip


@st.composite
def mutated(draw, value, depth=0):
    """``value`` with parts dropped, replaced by junk, or mutated in turn (nested junk)."""
    if depth > 2 or draw(st.integers(0, 2)) == 0:
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            action = draw(st.sampled_from(["keep"] * 5 + ["drop", "junk", "nest"]))
            if action == "keep":
                out[k] = v
            elif action == "junk":
                out[k] = draw(VALUES)
            elif action == "nest":
                out[k] = draw(mutated(v, depth + 1))
        if draw(st.booleans()):
            out[draw(st.text(string.ascii_letters, min_size=1, max_size=6))] = draw(VALUES)
        return out
    if isinstance(value, list):
        out = [draw(mutated(v, depth + 1)) for v in value if draw(st.integers(0, 5))]
        return out + draw(st.lists(VALUES, max_size=1))
    return draw(VALUES)


@st.composite
def rows_of(draw, layout):
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        row = draw(mutated(VALID[layout]))
        rows.append(row if draw(st.integers(0, 9)) else draw(VALUES))  # now and then no object
    return rows


def _cell(v):
    return json.dumps(v) if isinstance(v, list | dict) else v


def _text(v):
    return v if v is None or isinstance(v, str) else json.dumps(v)


def write_file(data, folder, rows):
    """Write ``rows`` to a file of a drawn kind, mutated; returns (path, expected row count or
    None when the file is not meant to load)."""
    suffix = data.draw(st.sampled_from(SUFFIXES))
    path = folder / f"rows{suffix}"
    mutation = data.draw(
        st.sampled_from(["none"] * 5 + ["bom", "truncate", "garbage", "latin1", "nested"])
    )
    count = None
    if suffix == ".jsonl":
        raw = "".join(json.dumps(r) + "\n" for r in rows).encode()
        if mutation == "nested":
            raw += data.draw(NESTED).encode() + b"\n"
        count = len([x for x in raw.decode("utf-8-sig").splitlines() if x.strip()])
    elif suffix == ".json":
        obj = rows if data.draw(st.integers(0, 5)) else data.draw(VALUES)  # a non-array .json
        raw = json.dumps(obj).encode()
        count = len(obj) if isinstance(obj, list) else None
        if mutation == "nested":
            raw, count = data.draw(NESTED).encode(), None
    elif suffix == ".csv":
        dicts = [r for r in rows if isinstance(r, dict)] or [{}]
        columns = list(dict.fromkeys(k for r in dicts for k in r)) or ["prompt"]
        with path.open("w", newline="", encoding="utf-8", errors="surrogatepass") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            for r in dicts:
                w.writerow({k: _cell(v) for k, v in r.items()})
        raw = path.read_bytes()
        count = len(dicts)
    else:
        dicts = [r for r in rows if isinstance(r, dict)] or [{"x": None}]
        columns = list(dict.fromkeys(k for r in dicts for k in r))
        try:  # typed columns where Arrow can write them, else JSON text
            if not data.draw(st.booleans()):
                raise TypeError
            pq.write_table(
                pa.table({c: pa.array([r.get(c) for r in dicts]) for c in columns}), path
            )
        except (TypeError, OverflowError, pa.lib.ArrowException):
            pq.write_table(pa.table({c: [_text(r.get(c)) for r in dicts] for c in columns}), path)
        raw = path.read_bytes()
        count = len(dicts)
    if mutation == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif mutation == "truncate":
        raw = raw[: max(1, len(raw) - data.draw(st.integers(1, 40)))]
        count = None
    elif mutation == "garbage":
        raw += b"{not json\n"
        count = None
    elif mutation == "latin1":
        raw += '{"query": "caf\xe9"}\n'.encode("latin-1")
        count = None
    path.write_bytes(raw)
    return path, count


def check_error(e, path):
    message = str(e)
    assert str(path) in message, message
    assert len(message.replace(str(path), "")) < 600, message[:2000]  # no 200 kB value quoted
    assert WHERE.search(message) or any(w in message for w in WHOLE_FILE), message
    if re.search(r"(line|row) \d+:", message) and "JSON" not in message and "UTF-8" not in message:
        assert "field" in message or "expected" in message, message  # a row's error names it


def run(load, path):
    """Load; an InputError must name the file and where; returns the result or None."""
    try:
        return load(str(path))
    except InputError as e:
        check_error(e, path)
        return None


@pytest.mark.parametrize("layout", EMBEDDING)
@FUZZ
@given(data=st.data())
def test_fuzzed_embedding_files_load_or_name_file_line_field(tmp_path_factory, layout, data):
    path, count = write_file(data, tmp_path_factory.mktemp("fz"), data.draw(rows_of(layout)))
    k = data.draw(st.integers(0, 2))
    if layout == "corpus":
        load = ef.load_corpus
    elif layout == "preference":
        load = lambda p: ef.load_rows(p, ef.PREFERENCE, columns=None)  # noqa: E731
    else:
        columns = {"query": "question", "positives": "answer", "negatives": "neg_a+neg_b"}
        columns = columns if layout == "columns" else None
        load = lambda p: ef.load_rows(p, ef.TRIPLES, columns=columns, num_negatives=k)  # noqa: E731
    loaded = run(load, path)
    if loaded is not None and count is not None:  # nothing dropped: one row per record
        assert len(loaded) == count


@pytest.mark.parametrize("layout", RERANKER)
@FUZZ
@given(data=st.data())
def test_fuzzed_reranker_files_load_or_name_file_line_field(tmp_path_factory, layout, data):
    path, count = write_file(data, tmp_path_factory.mktemp("fz"), data.draw(rows_of(layout)))
    kind = data.draw(st.sampled_from(sorted(rf.IDENTIFIERS)))
    loaded = run(lambda p: rf.load_rows(p, kind), path)
    if loaded is not None and count is not None:
        assert len(loaded) == count


@pytest.mark.parametrize("layout", AEPO)
@FUZZ
@given(data=st.data())
def test_fuzzed_aepo_responses_load_or_name_file_line_field(tmp_path_factory, layout, data):
    path, count = write_file(data, tmp_path_factory.mktemp("fz"), data.draw(rows_of(layout)))
    n = data.draw(st.sampled_from([None, 1, 2, 3]))
    skip_short = data.draw(st.booleans())
    loaded = run(lambda p: read_instructions(p, n, skip_short=skip_short), path)
    if loaded is not None:
        instructions, N = loaded
        assert N >= 1 and all(len(r.responses) == N for r in instructions.rows)
        if count is not None:  # every row loaded or skipped, and the skips are in the summary
            assert len(instructions.rows) + instructions.short == count
        if instructions.short:
            assert f"skipped {instructions.short} rows" in instructions.summary(N)


# ---------------------------------------------------------------------------------------------
# What the fuzz (and reading the readers with it in mind) found: each was a traceback, a
# message quoting a 200 kB value, or a refusal of a valid file.

DEEP = "[" * 50_000 + "]" * 50_000
PLAIN = {"query": "q", "passages": ["a", "b"], "ranking": [0]}


def _lm(fmt):
    from fastpref.families.lm_formats import load_rows

    return lambda p: load_rows(p, fmt)


def _triples(p):
    return ef.load_rows(p, ef.TRIPLES, columns=None)


def _rerank(p):
    return rf.load_rows(p, "alpha")


def _aepo(p):
    return read_instructions(p, None)


ERRORS = [  # (loader, file name, content, what the error says)
    (_lm("pair"), "deep.jsonl", DEEP + "\n", "line 1: not valid JSON (nested too deeply)"),
    (_lm("pair"), "digits.jsonl", '{"prompt": ' + "1" * 5000 + "}\n", "line 1: not valid JSON"),
    (_lm("list"), "score.jsonl", '{"prompt": "p", "responses": ["a", "b"], "scores": [1'
     + "0" * 400 + ", 0]}\n", "line 1: field 'scores' holds an integer too large"),
    (_rerank, "rel.jsonl", '{"query": "q", "passages": ["a", "b"], "relevance": [1'
     + "0" * 400 + ", 0]}\n", "line 1: field 'relevance' has a grade over 2**53"),
    (_rerank, "latin1.json", '[{"query": "caf\xe9"}]'.encode("latin-1"), "not UTF-8 text"),
    (_rerank, "dup.jsonl", "".join(json.dumps({**PLAIN, "qid": q}) + "\n" for q in (7, "7")),
     "line 2: field 'qid' '7' is the qid of"),
    (_rerank, "qid.jsonl", json.dumps({**PLAIN, "qid": {"a": 1}}) + "\n",
     "line 1: field 'qid' must be a string or a number, got dict"),
    (_rerank, "role.jsonl", json.dumps({"conversations": [{"from": "y" * 200_000, "value": "x"}]})
     + "\n", "line 1: field 'conversations' turn 0 has unknown role 'yyy"),
    (lambda p: ef.load_rows(p, ef.PREFERENCE, columns=None), "pref.jsonl",
     json.dumps({"query": "q", "passage1": "a", "passage2": "b", "preferred": "y" * 200_000})
     + "\n", "line 1: field 'preferred' must be"),
    (_aepo, "deep.jsonl", DEEP + "\n", ":1:1: not valid JSON (nested too deeply)"),
    (_aepo, "deep.csv", 'prompt,responses\np,"' + DEEP + '"\n', ":2:responses: a CSV 'responses'"),
    (_aepo, "latin1.jsonl", '{"prompt": "caf\xe9"}\n'.encode("latin-1"), ":1: not UTF-8 text"),
    (_aepo, "latin1.csv", "prompt,r1\nok,a\ncaf\xe9,a\n".encode("latin-1"), ":3: not UTF-8 text"),
    (_aepo, "latin1.json", '[{"prompt": "caf\xe9"}]'.encode("latin-1"), ":1: not UTF-8 text"),
    (_aepo, "broken.parquet", b"PAR1" + b"\0" * 64, "cannot read it as Parquet"),
    (_aepo, "list.jsonl", json.dumps({"prompt": "p", "r": ["y" * 200_000]}) + "\n",
     ":1:r: a response must be text, got list"),
]  # fmt: skip


@pytest.mark.parametrize(("load", "name", "content", "message"), ERRORS, ids=[c[1] for c in ERRORS])
def test_hostile_files_found_by_the_fuzz_are_input_errors(tmp_path, load, name, content, message):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(InputError) as e:
        load(str(path))
    assert str(path) in str(e.value) and message in str(e.value), e.value
    assert len(str(e.value)) < 600, str(e.value)[:600]


BOM = b"\xef\xbb\xbf"
LOADS = [  # (loader, file name, content, rows): valid files the readers refused
    (_rerank, "bom.json", BOM + json.dumps([PLAIN]).encode(), 1),
    (_aepo, "bom.jsonl", BOM + b'{"prompt": "p", "responses": ["a", "b"]}\n', 1),
    (_aepo, "bom.csv", BOM + b"prompt,r1,r2\np,a,b\n", 1),
    (_aepo, "long.csv", ("prompt,r1,r2\np," + "y" * 200_000 + ",b\n").encode(), 1),  # > 128 KiB
    (_aepo, "sep.jsonl", json.dumps({"prompt": "p\u2028q", "responses": ["a\u2029", "b"]},
     ensure_ascii=False).encode() + b"\n", 1),  # a Unicode line separator inside a string
]  # fmt: skip


@pytest.mark.parametrize(("load", "name", "content", "rows"), LOADS, ids=[c[1] for c in LOADS])
def test_valid_files_with_a_bom_or_a_long_cell_load(tmp_path, load, name, content, rows):
    path = tmp_path / name
    path.write_bytes(content)
    out = load(str(path))
    assert len(out[0].rows if isinstance(out, tuple) else out) == rows


def test_the_csv_field_limit_is_restored_after_reading(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("prompt,r1\np," + "y" * 200_000 + "\n")
    before = csv.field_size_limit()
    read_instructions(str(path), None)
    assert csv.field_size_limit() == before
