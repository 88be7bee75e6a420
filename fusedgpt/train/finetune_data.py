"""Fine-tuning data: reading labelled texts and instructions, deterministic splits, and two
small real datasets built from the bundled Shakespeare.

Files
-----
- Labelled texts (``fusedgpt finetune-classify``): CSV (``.csv``), TSV (``.tsv``) with a
  header row, JSON Lines (``.jsonl``: one object per line) or JSON (``.json``: a list of
  objects), with a text column and a label column (``text`` and ``label`` unless chosen
  otherwise). Labels are read as strings (``1`` and ``"1"`` are one label).
- Instructions (``fusedgpt finetune-instruct``): JSON or JSON Lines records in the Alpaca
  layout, ``{"instruction": ..., "input": ... (optional), "output": ...}``.

Every problem -- a missing file, an empty one, a missing column, a row without text --
is a :class:`FinetuneDataError` (a ``ValueError``) naming the file and the row.

The bundled datasets
--------------------
Both are parsed from ``fusedgpt/assets/shakespeare.txt``: each work starts with its title
line above ``by William Shakespeare``; in the 37 plays a speech is a speaker line (``HAMLET.``,
``Ham.`` or, in one play, ``HERMIA`` without the period) after a blank line, followed by
its text up to the next blank line; ``[stage directions]`` are removed. The five poems
have no speeches and are left out.

- :func:`genre_dataset` -- *which kind of play is this speech from?* The genres follow the
  First Folio's catalogue (comedies, histories, tragedies; so Cymbeline and Troilus and
  Cressida are tragedies and The Tempest and The Winter's Tale comedies); Pericles, which
  the Folio lacks, is counted with the comedies, as the late romance it is. From each play
  ``per_play`` speeches of 10 to 60 words are drawn, and split 80/10/10 within each play
  into train/val/test: every play, hence every genre, has the same share in each split
  (15 comedies, 10 histories, 12 tragedies: the majority class, comedy, is 40.5%).
  The split is by speech, not by play, so a test speech comes from a play seen in training
  and names of characters and places help; the task is genre *recognition* over known
  plays, not a test of style on unseen plays.
- :func:`instruction_dataset` -- four instructions about a speech: which kind of play it
  is from, which play, who speaks it, and what its next line is. The eligible speeches are
  shuffled and split into training and held-out speeches first, so no held-out instruction
  shows a speech seen in training.

Both depend only on the corpus and the seed.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar, Union

PathLike = Union[str, os.PathLike]
T = TypeVar("T")

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


class FinetuneDataError(ValueError):
    """Fine-tuning data that cannot be used; the message names the file and row."""


# --------------------------------------------------------------------------- reading files


def read_records(path: PathLike) -> list[dict[str, Any]]:
    """The rows of a CSV/TSV file (by its header) or the objects of a JSON Lines / JSON file,
    read as UTF-8 (a leading byte-order mark is skipped).

    Raises:
        FileNotFoundError: no such file.
        FinetuneDataError: an unknown suffix, text that is not UTF-8, a malformed row, or no
            rows at all.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise FinetuneDataError(f"{path}: unknown file type {suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    text = _decode(path, path.read_bytes())
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(keepends=True), delimiter="," if suffix == ".csv" else "\t")
        records = []
        for row in reader:
            if None in row or None in row.values():  # DictReader's marks for a ragged row
                fields = sum(k is not None and v is not None for k, v in row.items()) + len(row.get(None, ()))
                raise FinetuneDataError(f"{path}, line {reader.line_num}: has {fields} fields, "
                                        f"the header {len(reader.fieldnames or [])}")
            records.append(row)
    elif suffix == ".jsonl":
        records = [_json_object(path, line, number) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        try:
            records = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as exc:
            raise FinetuneDataError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise FinetuneDataError(f"{path}: a .json file must hold a list of objects")
    if not records:
        raise FinetuneDataError(f"{path} is empty: no examples")
    return records


def _decode(path: Path, raw: bytes) -> str:
    """The text of a UTF-8 file, without the byte-order mark some programs write first
    (Excel's "CSV UTF-8"), which would otherwise become part of the first column's name.

    Raises:
        FinetuneDataError: the file is not UTF-8, naming the line and the byte.
    """
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise FinetuneDataError(
            f"{path}, line {line}: not UTF-8 text (byte {raw[exc.start]:#04x}: {exc.reason}); save the file as UTF-8 "
            "-- a byte like this is usually Latin-1 or Windows-1252, e.g. `iconv -f latin1 -t utf-8 FILE`") from exc


def _json_object(path: Path, line: str, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise FinetuneDataError(f"{path}, line {number}: not valid JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise FinetuneDataError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
    return record


def _field(path: PathLike, index: int, record: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise FinetuneDataError(f"{path}, example {index + 1}: no {key!r}")
        return ""
    if isinstance(value, (dict, list)):
        raise FinetuneDataError(f"{path}, example {index + 1}: {key!r} must be text, got {type(value).__name__}")
    return str(value)


def read_labeled(path: PathLike, text_column: str = "text", label_column: str = "label") -> list[tuple[str, str]]:
    """``(text, label)`` pairs from a labelled-text file (see the module docstring).

    Raises:
        FinetuneDataError: the file is empty, lacks a column (the message lists the columns
            it has), or a row has an empty text or label.
    """
    records = read_records(path)
    columns = list(records[0])
    for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column not in columns:
            raise FinetuneDataError(f"{path}: no column {column!r} (it has {columns}); choose the column with {flag}")
    pairs = []
    for index, record in enumerate(records):
        text, label = (_field(path, index, record, c).strip() for c in (text_column, label_column))
        if not text or not label:
            missing = text_column if not text else label_column
            raise FinetuneDataError(f"{path}, example {index + 1}: empty {missing!r}")
        pairs.append((text, label))
    return pairs


@dataclass(frozen=True)
class Instruction:
    """One Alpaca-style example; ``input`` may be empty."""

    instruction: str
    input: str
    output: str

    def to_dict(self) -> dict[str, str]:
        return {"instruction": self.instruction, "input": self.input, "output": self.output}


def read_instructions(path: PathLike) -> list[Instruction]:
    """Alpaca-style examples from a JSON or JSON Lines file; ``input`` is optional.

    Raises:
        FinetuneDataError: the file is empty, or an example lacks ``instruction`` or ``output``.
    """
    if Path(path).suffix.lower() not in (".json", ".jsonl"):
        raise FinetuneDataError(f"{path}: instructions must be a .json or .jsonl file")
    examples = []
    for index, record in enumerate(read_records(path)):
        instruction = _field(path, index, record, "instruction").strip()
        if not instruction:
            raise FinetuneDataError(f"{path}, example {index + 1}: empty 'instruction'")
        examples.append(Instruction(instruction, _field(path, index, record, "input", required=False).strip(),
                                    _field(path, index, record, "output")))
    return examples


def split(items: Sequence[T], fractions: Sequence[float], seed: int) -> list[list[T]]:
    """A deterministic shuffle of ``items`` cut into ``len(fractions) + 1`` parts: the last
    parts take ``round(fraction * len(items))`` items each, the first part the rest.

    Raises:
        FinetuneDataError: a fraction outside [0, 1), or a part that would be empty.
    """
    if any(not 0 <= f < 1 for f in fractions) or sum(fractions) >= 1:
        raise FinetuneDataError(f"split fractions must be in [0, 1) and sum below 1, got {list(fractions)}")
    order = list(items)
    random.Random(seed).shuffle(order)
    sizes = [round(f * len(order)) for f in fractions]
    first = len(order) - sum(sizes)
    if first < 1 or any(f > 0 and s < 1 for f, s in zip(fractions, sizes)):
        raise FinetuneDataError(f"{len(order)} examples are too few to split by {list(fractions)}")
    parts, start = [order[:first]], first
    for size in sizes:
        parts.append(order[start : start + size])
        start += size
    return parts


def write_csv(path: PathLike, rows: Iterable[dict[str, str]], columns: Sequence[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def write_jsonl(path: PathLike, records: Iterable[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- the bundled corpus

COMEDY, HISTORY, TRAGEDY = "comedy", "history", "tragedy"

# Title line in the corpus -> (the usual short title, genre after the First Folio).
PLAYS: dict[str, tuple[str, str]] = {
    "ALL'S WELL THAT ENDS WELL": ("All's Well That Ends Well", COMEDY),
    "ANTONY AND CLEOPATRA": ("Antony and Cleopatra", TRAGEDY),
    "AS YOU LIKE IT": ("As You Like It", COMEDY),
    "THE COMEDY OF ERRORS": ("The Comedy of Errors", COMEDY),
    "THE TRAGEDY OF CORIOLANUS": ("Coriolanus", TRAGEDY),
    "CYMBELINE": ("Cymbeline", TRAGEDY),
    "HAMLET, PRINCE OF DENMARK": ("Hamlet", TRAGEDY),
    "KING HENRY IV, THE FIRST PART": ("Henry IV, Part 1", HISTORY),
    "KING HENRY IV, SECOND PART": ("Henry IV, Part 2", HISTORY),
    "THE LIFE OF KING HENRY V": ("Henry V", HISTORY),
    "KING HENRY VI, FIRST PART": ("Henry VI, Part 1", HISTORY),
    "HISTORY OF KING HENRY THE SIXTH, SECOND PART": ("Henry VI, Part 2", HISTORY),
    "THE HISTORY OF KING HENRY THE SIXTH, THIRD PART": ("Henry VI, Part 3", HISTORY),
    "THE LIFE OF HENRY THE EIGHTH": ("Henry VIII", HISTORY),
    "KING JOHN": ("King John", HISTORY),
    "JULIUS CAESAR": ("Julius Caesar", TRAGEDY),
    "THE TRAGEDY OF KING LEAR": ("King Lear", TRAGEDY),
    "LOVE'S LABOUR'S LOST": ("Love's Labour's Lost", COMEDY),
    "MACBETH": ("Macbeth", TRAGEDY),
    "MEASURE FOR MEASURE": ("Measure for Measure", COMEDY),
    "THE MERCHANT OF VENICE": ("The Merchant of Venice", COMEDY),
    "THE MERRY WIVES OF WINDSOR": ("The Merry Wives of Windsor", COMEDY),
    "A MIDSUMMER NIGHT'S DREAM": ("A Midsummer Night's Dream", COMEDY),
    "MUCH ADO ABOUT NOTHING": ("Much Ado About Nothing", COMEDY),
    "OTHELLO, THE MOOR OF VENICE": ("Othello", TRAGEDY),
    "PERICLES PRINCE OF TYRE": ("Pericles", COMEDY),
    "THE TRAGEDY OF KING RICHARD THE SECOND": ("Richard II", HISTORY),
    "THE LIFE AND DEATH OF KING RICHARD III": ("Richard III", HISTORY),
    "ROMEO AND JULIET": ("Romeo and Juliet", TRAGEDY),
    "THE TAMING OF THE SHREW": ("The Taming of the Shrew", COMEDY),
    "THE TEMPEST": ("The Tempest", COMEDY),
    "THE LIFE OF TIMON OF ATHENS": ("Timon of Athens", TRAGEDY),
    "THE TRAGEDY OF TITUS ANDRONICUS": ("Titus Andronicus", TRAGEDY),
    "THE HISTORY OF TROILUS AND CRESSIDA": ("Troilus and Cressida", TRAGEDY),
    "TWELFTH NIGHT; OR, WHAT YOU WILL": ("Twelfth Night", COMEDY),
    "THE TWO GENTLEMEN OF VERONA": ("The Two Gentlemen of Verona", COMEDY),
    "THE WINTER'S TALE": ("The Winter's Tale", COMEDY),
}
POEMS = frozenset({"A LOVER'S COMPLAINT", "THE PASSIONATE PILGRIM", "THE PHOENIX AND THE TURTLE",
                   "THE RAPE OF LUCRECE", "THE SONNETS"})
BYLINE = "by William Shakespeare"

# A speaker line: a name and a period ("HAMLET.", "Ham.", "Lady Capulet."), or an
# all-capitals name alone ("HERMIA"); act and scene headings are not speakers. A name has
# at most five words, each capitalised but for a few joining words: a verse line that ends
# in a period and opens a paragraph ("Saddle my horse.") is not a speaker.
_SPEAKER = re.compile(r"^(?!(?i:act|scene)\b)([A-Z][A-Za-z'&\- ]{0,40}[A-Za-z])(\.?)$")
_NAME_JOINERS = frozenset({"and", "of", "the", "to"})
_STAGE_DIRECTION = re.compile(r"\[[^\]]*\]")


@dataclass(frozen=True)
class Speech:
    play: str      # short title, e.g. "Hamlet"
    genre: str     # comedy | history | tragedy
    speaker: str   # as the text names it, without the period, e.g. "HAMLET", "Ham"
    text: str      # the lines, newline-separated, stage directions removed

    @property
    def words(self) -> int:
        return len(self.text.split())


def _works(lines: list[str]) -> Iterable[tuple[str, list[str]]]:
    """(title line, lines) of each work: a title is the last non-blank line above a byline."""
    starts = []
    for i, line in enumerate(lines):
        if line == BYLINE:
            title = next(j for j in range(i - 1, -1, -1) if lines[j])
            starts.append(title)
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(lines)
        yield lines[start], lines[start:end]


def _is_name(name: str) -> bool:
    words = name.split()
    return len(words) <= 5 and all(w[0].isupper() or w in _NAME_JOINERS for w in words)


def _speeches(lines: list[str]) -> Iterable[tuple[str, str]]:
    """(speaker, text) of each speech among a play's (stripped) lines."""
    i = 0
    while i < len(lines):
        match = _SPEAKER.match(lines[i])
        starts_block = i == 0 or not lines[i - 1]
        is_speaker = match and (match.group(2) or match.group(1).isupper()) and _is_name(match.group(1))
        if not (starts_block and is_speaker and i + 1 < len(lines) and lines[i + 1]):
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end]:
            end += 1
        text = _STAGE_DIRECTION.sub("", "\n".join(lines[i + 1 : end]))
        text = "\n".join(line.strip() for line in text.split("\n") if line.strip())
        if text:
            yield " ".join(match.group(1).split()), text
        i = end


@functools.lru_cache(maxsize=1)
def corpus_speeches() -> tuple[Speech, ...]:
    """Every speech of the 37 plays in the bundled corpus, in corpus order.

    Raises:
        FinetuneDataError: a work whose title is neither in :data:`PLAYS` nor in
            :data:`POEMS` (the corpus changed), or a play without speeches.
    """
    from fusedgpt.model.tokenizer import shakespeare_path

    lines = [line.strip() for line in shakespeare_path().read_text(encoding="utf-8").split("\n")]
    speeches = []
    for title, work in _works(lines):
        if title in POEMS:
            continue
        if title not in PLAYS:
            raise FinetuneDataError(f"the bundled corpus has a work {title!r} that fusedgpt does not know")
        play, genre = PLAYS[title]
        found = [Speech(play, genre, speaker, text) for speaker, text in _speeches(work)]
        if not found:
            raise FinetuneDataError(f"no speeches found in {play} in the bundled corpus")
        speeches.extend(found)
    return tuple(speeches)


def _eligible(min_words: int, max_words: int) -> list[Speech]:
    return [s for s in corpus_speeches() if min_words <= s.words <= max_words]


def genre_dataset(per_play: int = 100, seed: int = 0, min_words: int = 10,
                  max_words: int = 60) -> dict[str, list[dict[str, str]]]:
    """``{"train", "val", "test"}`` -> rows ``{"text", "label"}`` (label: comedy, history or
    tragedy): ``per_play`` speeches of ``min_words``..``max_words`` words from each play,
    split 80/10/10 within each play (see the module docstring)."""
    if per_play < 10:
        raise ValueError(f"per_play must be at least 10 (to give each split a speech), got {per_play}")
    by_play: dict[str, list[Speech]] = {}
    for speech in _eligible(min_words, max_words):
        by_play.setdefault(speech.play, []).append(speech)
    rng = random.Random(seed)
    splits: dict[str, list[dict[str, str]]] = {"train": [], "val": [], "test": []}
    for play, speeches in by_play.items():
        if len(speeches) < per_play:
            raise ValueError(f"{play} has only {len(speeches)} speeches of {min_words}-{max_words} words, "
                             f"fewer than per_play={per_play}")
        chosen = rng.sample(speeches, per_play)
        n_val = n_test = per_play // 10
        parts = {"val": chosen[:n_val], "test": chosen[n_val : n_val + n_test], "train": chosen[n_val + n_test :]}
        for name, part in parts.items():
            splits[name].extend({"text": s.text, "label": s.genre} for s in part)
    return splits


def _genre_task(speech: Speech, rng: random.Random) -> Instruction:
    return Instruction("Which kind of play is this speech from: comedy, history or tragedy?", speech.text, speech.genre)


def _play_task(speech: Speech, rng: random.Random) -> Instruction:
    return Instruction("Which play by Shakespeare is this speech from?", speech.text, speech.play)


def _speaker_task(speech: Speech, rng: random.Random) -> Instruction:
    name = " ".join(word.capitalize() for word in speech.speaker.split())
    return Instruction(f"Who speaks these lines in {speech.play}?", speech.text, name)


def _continue_task(speech: Speech, rng: random.Random) -> Instruction:
    lines = speech.text.split("\n")
    cut = rng.randrange(1, len(lines))
    return Instruction("Continue this speech with its next line.", "\n".join(lines[:cut]), lines[cut])


INSTRUCTION_TASKS = {"genre": _genre_task, "play": _play_task, "speaker": _speaker_task, "continue": _continue_task}


def instruction_dataset(per_task: int = 250, seed: int = 0, val_fraction: float = 0.1, min_words: int = 8,
                        max_words: int = 40) -> dict[str, list[Instruction]]:
    """``{"train", "val"}`` -> Alpaca-style examples: ``per_task`` of each of the four
    :data:`INSTRUCTION_TASKS`, a ``val_fraction`` share of each held out. Speeches of
    ``min_words``..``max_words`` words; "continue" uses speeches of two or more lines and
    cuts each at a random line."""
    train_pool, val_pool = split(_eligible(min_words, max_words), [val_fraction], seed)
    rng = random.Random(seed)
    n_val = max(1, round(val_fraction * per_task))
    out: dict[str, list[Instruction]] = {"train": [], "val": []}
    for name, task in INSTRUCTION_TASKS.items():
        for part, pool, count in (("train", train_pool, per_task - n_val), ("val", val_pool, n_val)):
            if name == "continue":
                pool = [s for s in pool if "\n" in s.text]
            if len(pool) < count:
                raise ValueError(f"only {len(pool)} speeches for {count} {part} examples of task {name!r}")
            out[part].extend(task(speech, rng) for speech in rng.sample(pool, count))
    return out
