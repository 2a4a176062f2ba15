"""Reading AEPO responses files (the row policy) and the resumable preference writer."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastpref.data.aepo_io import (
    PreferenceWriter,
    list_row,
    pair_row,
    read_instructions,
    read_prompts,
    write_rows,
)
from fastpref.errors import ConfigError, DataError
from fastpref.paths import bundled_data


def _csv(path, header, rows):
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name", ["prompt", "instruction"])
def test_prompt_column_is_never_a_candidate(tmp_path, name):
    # the seed tool's `or` kept the prompt as a response (and dropped the last real one)
    src = _csv(tmp_path / "r.csv", ["a", name, "b", "c"], [["x1", "Q1", "y1", "z1"]])
    data, n = read_instructions(src, None)
    assert n == 3
    (row,) = data.rows
    assert row.prompt == "Q1" and row.responses == ("x1", "y1", "z1")
    assert "Q1" not in row.responses


def test_bundled_responses_have_sixteen_distinct_responses_per_instruction():
    data, n = read_instructions(str(bundled_data("aepo_responses.jsonl")), None)
    assert n == 16 and len(data.rows) == 100 and data.summary(16) == ""
    assert all(len(set(r.responses)) == 16 and r.prompt not in r.responses for r in data.rows)


def test_responses_list_column_in_jsonl_csv_and_parquet(tmp_path):
    rows = [{"prompt": "Q", "responses": ["a", "b", "c"], "id": 7}]
    path = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    sources = [
        _jsonl(tmp_path / "r.jsonl", rows),
        _csv(tmp_path / "r.csv", ["prompt", "responses"], [["Q", json.dumps(["a", "b", "c"])]]),
        str(path),
    ]
    for src in sources:
        data, n = read_instructions(src, 3)
        assert n == 3 and data.rows[0].responses == ("a", "b", "c"), src
        assert data.rows[0].where == f"{src}:{2 if src.endswith('.csv') else 1}"


def test_empty_and_duplicate_responses_are_dropped_and_counted(tmp_path):
    src = _csv(
        tmp_path / "r.csv",
        ["prompt", "r0", "r1", "r2", "r3", "r4"],
        [["Q1", "a", "", "a", "b", "c"], ["Q2", "d", "e", "  ", "f", "g"]],
    )
    data, n = read_instructions(src, 3)
    assert [r.responses for r in data.rows] == [("a", "b", "c"), ("d", "e", "f")]
    assert (data.empty, data.duplicate, data.short) == (2, 1, 0)
    assert data.summary(3) == "dropped 2 empty responses; dropped 1 duplicate responses"


def test_a_short_row_is_an_error_naming_its_line_or_is_skipped_and_counted(tmp_path):
    src = _csv(
        tmp_path / "r.csv",
        ["prompt", "r0", "r1", "r2"],
        [["Q1", "a", "b", "c"], ["multi\nline", "a", "b", "c"], ["Q3", "a", "a", ""]],
    )
    with pytest.raises(DataError, match=r"r\.csv:5: 1 distinct non-empty responses, fewer than"):
        read_instructions(src, 3)  # line 5: the multi-line cell of row 2 spans lines 3-4
    data, _ = read_instructions(src, 3, skip_short=True)
    assert [r.prompt for r in data.rows] == ["Q1", "multi\nline"]
    assert data.short == 1 and data.first_short == f"{src}:5"
    assert "skipped 1 rows with fewer than 3" in data.summary(3)


def test_bad_cells_name_file_line_and_column(tmp_path):
    src = _jsonl(tmp_path / "r.jsonl", [{"prompt": "Q", "r0": "a", "r1": 3}])
    with pytest.raises(DataError, match=r"r\.jsonl:1:r1: a response must be text, got int"):
        read_instructions(src, 2)
    src = _jsonl(tmp_path / "e.jsonl", [{"prompt": "Q", "r0": "a"}, {"prompt": " ", "r0": "b"}])
    with pytest.raises(DataError, match=r"e\.jsonl:2:prompt: the prompt is empty"):
        read_instructions(src, 1)
    src = _csv(tmp_path / "i.csv", ["", "prompt", "r0"], [["0", "Q", "a"]])
    with pytest.raises(DataError, match=r"i\.csv:2:1: column 1 has no name"):
        read_instructions(src, 1)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "Q", "r0": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"b\.jsonl:2:\d+: not valid JSON"):
        read_instructions(str(bad), 1)


def test_prompt_column_rules(tmp_path):
    both = _csv(tmp_path / "b.csv", ["prompt", "instruction", "r0"], [["Q", "I", "a"]])
    with pytest.raises(DataError, match="both 'prompt' and 'instruction'"):
        read_instructions(both, 1)
    data, _ = read_instructions(both, 2, prompt_column="instruction")
    assert data.rows[0].prompt == "I" and data.rows[0].responses == ("Q", "a")
    none = _csv(tmp_path / "n.csv", ["question", "r0"], [["Q", "a"]])
    with pytest.raises(DataError, match="no prompt column"):
        read_instructions(none, 1)
    assert read_prompts(none, prompt_column="question") == ["Q"]


def test_num_instructions_takes_the_first_rows(tmp_path):
    rows = [{"prompt": f"Q{i}", "responses": ["a", "b"]} for i in range(5)]
    data, _ = read_instructions(_jsonl(tmp_path / "r.jsonl", rows), 2, num_instructions=3)
    assert [r.prompt for r in data.rows] == ["Q0", "Q1", "Q2"]


def test_pair_and_list_rows_order_by_reward():
    responses, scores = ["a", "b", "c", "d"], [0.5, 2.0, -1.0, 0.5]
    assert pair_row("Q", responses, scores) == {
        "prompt": "Q",
        "chosen": "b",
        "rejected": "c",
        "chosen_reward": 2.0,
        "rejected_reward": -1.0,
    }
    row = list_row("Q", responses, scores)
    assert row["responses"] == ["b", "a", "d", "c"]  # the tie keeps its order
    assert row["scores"] == [2.0, 0.5, 0.5, -1.0]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_write_rows_round_trips_lists(tmp_path, suffix):
    rows = [list_row('Q, "quoted"\nline', ["a", "b"], [1.0, 0.0])]
    out = tmp_path / f"o{suffix}"
    write_rows(out, rows)
    data, _ = read_instructions(str(out), 2, prompt_column="prompt")
    assert data.rows[0].prompt == rows[0]["prompt"]
    assert data.rows[0].responses == ("a", "b")
    assert not list(tmp_path.glob("*.tmp"))


def test_writer_resumes_after_a_cut_row_and_refuses_other_settings(tmp_path):
    out = tmp_path / "pairs.jsonl"
    rows = [pair_row(f"Q{i}", ["a", "b"], [1.0, 0.0]) for i in range(4)]
    w = PreferenceWriter(out, {"k": 2})
    w.append(rows[:2])
    assert not out.exists() and w.journal.exists()
    with w.journal.open("a") as f:  # a kill in the middle of the next write
        f.write(json.dumps(rows[2])[:17])
    w = PreferenceWriter(out, {"k": 2})
    assert w.done == rows[:2] and not w.complete
    w.append(rows[2:])
    w.finish()
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert not w.journal.exists()
    assert PreferenceWriter(out, {"k": 2}).complete
    assert not PreferenceWriter(out, {"k": 2}, overwrite=True).complete
    w = PreferenceWriter(out, {"k": 2})
    w.append(rows[:1])
    with pytest.raises(ConfigError, match=r"other settings \(k: 2 -> 4\)"):
        PreferenceWriter(out, {"k": 4})


def test_unsupported_output_suffix_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="unsupported output type '.txt'"):
        PreferenceWriter(tmp_path / "o.txt", {})
