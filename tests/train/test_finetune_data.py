"""Fine-tuning data: the file formats, clear errors for bad files, deterministic splits, and
the datasets built from the bundled corpus."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from fusedgpt.train import finetune_data as fdata
from fusedgpt.train.finetune_data import FinetuneDataError

PAIRS = [("a merry jest, sir", "comedy"), ("my kingdom, for a horse", "history"), ('he said "no", twice', "tragedy")]


def write_labeled(path, pairs, text="text", label="label"):
    records = [{text: t, label: lab} for t, lab in pairs]
    if path.suffix == ".csv":
        fdata.write_csv(path, records, (text, label))
    elif path.suffix == ".tsv":
        path.write_text(f"{text}\t{label}\n" + "".join(f"{t}\t{lab}\n" for t, lab in pairs))
    elif path.suffix == ".jsonl":
        fdata.write_jsonl(path, records)
    else:
        path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json"])
def test_every_format_reads_the_same_pairs(tmp_path, suffix):
    path = write_labeled(tmp_path / f"data{suffix}", PAIRS, text="sentence", label="kind")
    assert fdata.read_labeled(path, "sentence", "kind") == PAIRS


def test_a_missing_column_is_named_with_the_columns_there_are(tmp_path):
    path = write_labeled(tmp_path / "data.csv", PAIRS, label="genre")
    with pytest.raises(FinetuneDataError, match=r"no column 'label' \(it has \['text', 'genre'\]\).*--label-column"):
        fdata.read_labeled(path)


@pytest.mark.parametrize("content", ["", "text,label\n"])
def test_an_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "data.csv"
    path.write_text(content)
    with pytest.raises(FinetuneDataError, match="is empty: no examples"):
        fdata.read_labeled(path)


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("data.csv", "text,label\nfine,a\nragged,b,extra\n", "line 3: has 3 fields, the header 2"),
        ("data.tsv", "text\tlabel\nfine\ta\nshort\n", "line 3: has 1 fields, the header 2"),
        ("data.csv", "text,label\n,a\n", "example 1: empty 'text'"),
        ("data.jsonl", '{"text": "x", "label": "a"}\n[1, 2]\n', "line 2: expected a JSON object"),
        ("data.jsonl", '{"text": "x", "label": "a"}\n{"text": \n', "line 2: not valid JSON"),
        ("data.jsonl", '{"text": "x", "label": "a"}\n{"text": "y"}\n', "example 2: no 'label'"),
        ("data.txt", "text,label\nx,a\n", "unknown file type '.txt'"),
    ],
)
def test_malformed_rows_are_named(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(FinetuneDataError, match=match):
        fdata.read_labeled(path)


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        fdata.read_labeled(tmp_path / "absent.csv")


def test_instructions_read_with_an_optional_input(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Add", "input": "1 2", "output": "3"}, {"instruction": "Hi", "output": "Hello"}]))
    assert fdata.read_instructions(path) == [fdata.Instruction("Add", "1 2", "3"), fdata.Instruction("Hi", "", "Hello")]
    path.write_text(json.dumps([{"instruction": "Add", "input": "1 2"}]))
    with pytest.raises(FinetuneDataError, match="example 1: no 'output'"):
        fdata.read_instructions(path)


def test_split_is_deterministic_disjoint_and_sized():
    items = list(range(103))
    train, val, test = fdata.split(items, [0.1, 0.2], seed=3)
    assert (len(train), len(val), len(test)) == (72, 10, 21)
    assert sorted(train + val + test) == items
    assert fdata.split(items, [0.1, 0.2], seed=3) == [train, val, test]
    assert fdata.split(items, [0.1, 0.2], seed=4) != [train, val, test]
    with pytest.raises(FinetuneDataError, match="too few"):
        fdata.split(items[:4], [0.1, 0.1], seed=0)


def test_speeches_are_parsed_with_both_speaker_styles_and_without_stage_directions():
    lines = ["ACT I.", "", "SCENE 1. A room.", "", "[Enter HAMLET.]", "", "HAMLET.", "To be, or not to be,",
             "  that is the question. [Aside.]", "", "Lady Capulet.", "What noise is here?", "", "HERMIA",
             "So is Lysander.", "", "Saddle my horse.", "Call Ross.", "", "[Exeunt.]"]
    lines = [line.strip() for line in lines]
    assert list(fdata._speeches(lines)) == [("HAMLET", "To be, or not to be,\nthat is the question."),
                                            ("Lady Capulet", "What noise is here?"), ("HERMIA", "So is Lysander.")]


def test_the_bundled_genre_dataset():
    splits = fdata.genre_dataset()
    sizes = {name: len(rows) for name, rows in splits.items()}
    assert sizes == {"train": 2960, "val": 370, "test": 370}
    # Stratified by play: 15 comedies, 10 histories, 12 tragedies, in every split.
    assert Counter(r["label"] for r in splits["test"]) == {"comedy": 150, "history": 100, "tragedy": 120}
    texts = [r["text"] for rows in splits.values() for r in rows]
    assert len(set(texts)) > 0.99 * len(texts)  # a few short speeches recur verbatim across plays
    assert all(10 <= len(t.split()) <= 60 and "[" not in t for t in texts)
    assert fdata.genre_dataset() == splits


def test_the_bundled_instruction_set_holds_out_unseen_speeches():
    data = fdata.instruction_dataset(per_task=40)
    assert (len(data["train"]), len(data["val"])) == (4 * 36, 4 * 4)
    assert not {e.input for e in data["train"]} & {e.input for e in data["val"]}
    by_task = Counter(e.instruction.split(" in ")[0] for e in data["val"])
    assert len(by_task) == 4
    genre = [e for e in data["train"] if e.instruction.startswith("Which kind")]
    assert {e.output for e in genre} <= {"comedy", "history", "tragedy"}
    assert fdata.instruction_dataset(per_task=40) == data
