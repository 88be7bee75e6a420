"""`fusedgpt prepare` and the token loaders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fusedgpt.cli import main
from fusedgpt.model.tokenizer import get_tokenizer
from fusedgpt.train import data
from fusedgpt.train.data import DataError, RandomWindows, TokenStream, eval_windows, prepare


def all_tokens(path) -> np.ndarray:
    return np.concatenate([TokenStream(path, "train").read(0, len(TokenStream(path, "train"))),
                           TokenStream(path, "val").read(0, len(TokenStream(path, "val")))])


def test_chunked_parallel_encoding_equals_whole_text(tmp_path, corpus_text):
    # Small chunks force many cuts; workers=2 with no threshold takes the process pool.
    (tmp_path / "a.txt").write_text(corpus_text)
    meta = prepare([tmp_path / "a.txt"], tmp_path / "out", val_fraction=0.1, progress=False,
                   chunk_chars=2000, workers=2, process_threshold_bytes=0, shard_tokens=5000)
    enc = get_tokenizer("gpt2")
    expected = enc.encode_ordinary(corpus_text) + [enc.eot_token]
    assert len(meta["train_shards"]) > 2  # windows will cross shard boundaries
    assert meta["train_tokens"] + meta["val_tokens"] == len(expected)
    assert meta["val_tokens"] == round(0.1 * len(expected))
    np.testing.assert_array_equal(all_tokens(tmp_path / "out"), expected)


def test_directories_and_jsonl_become_documents_separated_by_eot(tmp_path):
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "b.txt").write_text("second file")
    (tmp_path / "dir" / "sub" / "a.md").write_text("nested file")
    (tmp_path / "dir" / ".hidden.txt").write_text("never read")
    (tmp_path / "dir" / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 3}) + "\n")
    prepare([tmp_path / "docs.jsonl", tmp_path / "dir"], tmp_path / "out", val_fraction=0.0, progress=False)
    enc = get_tokenizer("gpt2")
    expected = []
    for text in ["one", "two", "second file", "nested file"]:
        expected += enc.encode_ordinary(text) + [enc.eot_token]
    np.testing.assert_array_equal(TokenStream(tmp_path / "out", "train").read(0, len(expected)), expected)
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["val_shards"] == []


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", b"", "holds no text"),
        ("binary.txt", b"\xff\xfe\x00bad", "not UTF-8"),
        ("bad.jsonl", b'{"text": "ok"}\n{oops\n', "bad.jsonl:2: not valid JSON"),
        ("nofield.jsonl", b'{"body": "x"}\n', "string field 'text'"),
        ("emptydir", "directory", "holds no"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "directory":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare([path], tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()


@pytest.mark.parametrize(
    "bad_input, options, message",
    [
        ("binary.txt", {}, "not UTF-8"),  # found only while tokenising
        ("empty.txt", {}, "holds no text"),
        ("missing.txt", {}, "does not exist"),
        ("good.txt", {"tokenizer": "no-such.tiktoken"}, "does not exist"),
    ],
)
def test_failed_preparation_keeps_the_earlier_one(tmp_path, bad_input, options, message):
    (tmp_path / "good.txt").write_text("To be, or not to be: that is the question.\n" * 40)
    (tmp_path / "binary.txt").write_bytes(b"fine text first\n" * 100 + b"\xff\xfe")
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "prepared"
    meta = prepare([tmp_path / "good.txt"], out, val_fraction=0.1, progress=False, shard_tokens=50)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises((DataError, FileNotFoundError), match=message):
        prepare([tmp_path / bad_input], out, progress=False, **options)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert data.read_meta(out) == meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["binary.txt", "empty.txt", "good.txt", "prepared"]


def test_preparing_again_replaces_the_whole_directory(tmp_path):
    (tmp_path / "long.txt").write_text("To be, or not to be: that is the question.\n" * 40)
    (tmp_path / "short.txt").write_text("Brevity is the soul of wit.\n")
    out = tmp_path / "prepared"
    assert len(prepare([tmp_path / "long.txt"], out, val_fraction=0.1, progress=False, shard_tokens=50)["train_shards"]) > 2
    meta = prepare([tmp_path / "short.txt"], out, val_fraction=0.1, progress=False, shard_tokens=50)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train_0000.bin", "val_0000.bin"]
    assert data.read_meta(out) == meta and len(TokenStream(out, "train")) == meta["train_tokens"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.txt", "prepared", "short.txt"]


def test_prepare_refuses_a_directory_holding_other_files(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "notes.txt").write_text("my notes")
    with pytest.raises(DataError, match=r"holds files that fusedgpt prepare did not write \(notes.txt\)"):
        prepare([tmp_path / "corpus" / "notes.txt"], tmp_path / "corpus", progress=False)
    assert [p.name for p in (tmp_path / "corpus").iterdir()] == ["notes.txt"]


def test_prepare_rejects_bad_options(tmp_path, corpus_text):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match="val_fraction"):
        prepare([tmp_path / "a.txt"], tmp_path / "out", val_fraction=1.0, progress=False)
    with pytest.raises(DataError, match="nothing left for training"):
        prepare([tmp_path / "a.txt"], tmp_path / "out", val_fraction=0.9, progress=False)


def test_damaged_shards_are_detected(tmp_path):
    tokens = np.arange(100, dtype=np.uint16)
    data.write_shard(tmp_path / "s.bin", tokens)
    np.testing.assert_array_equal(data.open_shard(tmp_path / "s.bin"), tokens)
    raw = (tmp_path / "s.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(raw[:-10])
    with pytest.raises(DataError, match="truncated"):
        data.open_shard(tmp_path / "short.bin")
    (tmp_path / "magic.bin").write_bytes(b"NOTMAGIC" + raw[8:])
    with pytest.raises(DataError, match="not a token shard"):
        data.open_shard(tmp_path / "magic.bin")
    with pytest.raises(DataError, match="not a prepared data directory"):
        TokenStream(tmp_path, "train")


def test_random_windows_are_a_function_of_seed_step_and_micro(corpus_dir):
    stream = TokenStream(corpus_dir, "train")
    windows = RandomWindows(stream, batch_size=3, context_length=8, seed=1)
    x, y = windows.batch(step=5, micro=1)
    assert x.shape == y.shape == (3, 8) and x.dtype == y.dtype == torch.long
    torch.testing.assert_close(x[:, 1:], y[:, :-1])  # targets are the next tokens
    again = RandomWindows(TokenStream(corpus_dir, "train"), batch_size=3, context_length=8, seed=1)
    assert torch.equal(again.batch(5, 1)[0], x)
    assert not torch.equal(windows.batch(5, 0)[0], x)
    assert not torch.equal(windows.batch(6, 1)[0], x)
    assert not torch.equal(RandomWindows(stream, 3, 8, seed=2).batch(5, 1)[0], x)
    # Each window is a real slice of the split.
    row = x[0].numpy()
    flat = stream.read(0, len(stream))
    starts = np.flatnonzero(flat[: len(flat) - 8] == row[0])
    assert any((flat[s : s + 8] == row).all() for s in starts)


def test_reads_cross_shard_boundaries(tmp_path, corpus_text):
    (tmp_path / "a.txt").write_text(corpus_text[:5000])
    prepare([tmp_path / "a.txt"], tmp_path / "one", val_fraction=0.1, progress=False)
    prepare([tmp_path / "a.txt"], tmp_path / "many", val_fraction=0.1, progress=False, shard_tokens=37)
    one, many = TokenStream(tmp_path / "one", "train"), TokenStream(tmp_path / "many", "train")
    assert len(one) == len(many) and len(many.shards) > 10
    for start in (0, 30, 36, 37, 100, len(one) - 80):
        np.testing.assert_array_equal(many.read(start, 80), one.read(start, 80))
    with pytest.raises(IndexError):
        many.read(len(many) - 5, 10)


def test_eval_windows_are_fixed_and_non_overlapping(corpus_dir):
    stream = TokenStream(corpus_dir, "val")
    batches = list(eval_windows(stream, batch_size=4, context_length=10, max_batches=3))
    assert len(batches) == 3 and all(x.shape == (4, 10) for x, _ in batches)
    xs = torch.cat([x for x, _ in batches])
    np.testing.assert_array_equal(xs.flatten().numpy(), stream.read(0, 120))
    assert torch.equal(torch.cat([x for x, _ in eval_windows(stream, 4, 10, 3)]), xs)
    with pytest.raises(DataError, match="larger --val-fraction"):
        list(eval_windows(stream, 1, len(stream), 1))


def test_prepare_command(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("To be, or not to be: that is the question.\n" * 50)
    assert main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out"), "--val-fraction", "0.1"]) == 0
    assert "training tokens" in capsys.readouterr().out
    assert data.is_prepared(tmp_path / "out")
    assert main(["prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n')
    meta = data.read_meta(tmp_path / "out")
    assert main(["prepare", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "out")]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert data.read_meta(tmp_path / "out") == meta and len(TokenStream(tmp_path / "out", "train")) == meta["train_tokens"]
