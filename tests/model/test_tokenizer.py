import base64
import hashlib
import json
import random
import unicodedata
from collections import Counter

import pytest
import regex
import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public as openai_public

from fusedgpt.model.tokenizer import (
    BPE,
    ENDOFTEXT,
    GPT2_EOT_ID,
    GPT2_PATTERN,
    GPT2_RANKS_SHA256,
    GPT2_VOCAB_SIZE,
    TokenizerFileError,
    get_tokenizer,
    gpt2_ranks_path,
    metadata_path,
    save_bpe,
    shakespeare_path,
    train_bpe,
)

SHAKESPEARE_SHA256 = "1ef38bdcc139744f64d26e13ed71cf81af263f0418df3a9c6083485e15813f1c"


# --- independent references: the textbook algorithms, with nothing incremental ----------


def naive_train(text, n_merges, pattern=GPT2_PATTERN):
    """Recount every pair from scratch at each step; ties go to the pair of lowest ids."""
    words = Counter(tuple(m.group().encode()) for m in regex.finditer(pattern, text))
    tokens = [bytes([b]) for b in range(256)]
    merges = []
    while len(merges) < n_merges:
        pairs = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        tokens.append(tokens[a] + tokens[b])
        merges.append((tokens[a], tokens[b]))
        words = Counter({tuple(_merge(list(w), a, b, len(tokens) - 1)): n for w, n in words.items()})
    return merges


def _merge(word, a, b, new):
    out = []
    while word:
        if word[:2] == [a, b]:
            out.append(new)
            del word[:2]
        else:
            out.append(word.pop(0))
    return out


def apply_merges(chunk: bytes, merges):
    """The tokens (as bytes) a merge list makes of one chunk: each merge in order, everywhere."""
    parts = [bytes([b]) for b in chunk]
    for left, right in merges:
        out = []
        while parts:
            if len(parts) > 1 and (parts[0], parts[1]) == (left, right):
                out.append(left + right)
                del parts[:2]
            else:
                out.append(parts.pop(0))
        parts = out
    return parts


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_text():
    return shakespeare_path().read_text(encoding="utf-8")[:60_000]


@pytest.fixture(scope="module")
def trained(sample_text):
    return train_bpe(sample_text, 600)


@pytest.fixture(params=["gpt2", "trained"])
def encoding(request, trained):
    return get_tokenizer("gpt2") if request.param == "gpt2" else trained.encoding()


@pytest.fixture
def no_tiktoken_cache(monkeypatch):
    # tiktoken's own loader caches every file it reads under a temp folder, keyed by path.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")


# --- bundled assets and GPT-2 ----------------------------------------------------------


def test_bundled_assets_match_their_provenance():
    readme = (shakespeare_path().parent / "README.md").read_text(encoding="utf-8")
    for path, sha in [(gpt2_ranks_path(), GPT2_RANKS_SHA256), (shakespeare_path(), SHAKESPEARE_SHA256)]:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
        assert sha in readme and path.name in readme
    assert shakespeare_path().stat().st_size == 5_056_502


@pytest.mark.parametrize(
    "text, ids",
    [
        ("Hello, world!", [15496, 11, 995, 0]),
        ("hello world", [31373, 995]),
        (" Hello", [18435]),
        (" the", [262]),
        ("\n\n", [628]),
        ("<|endoftext|>", [GPT2_EOT_ID]),
        ("Hello<|endoftext|> world", [15496, GPT2_EOT_ID, 995]),
    ],
)
def test_gpt2_known_ids(text, ids):
    gpt2 = get_tokenizer("gpt2")
    assert gpt2.encode(text, allowed_special={ENDOFTEXT}) == ids
    assert gpt2.decode(ids) == text


def test_gpt2_equals_tiktoken_definition(monkeypatch, no_tiktoken_cache):
    # tiktoken's own recipe for "gpt2", with its downloads pointed at the bundled file;
    # tiktoken's loader checks the file against the r50k_base sha256 it knows.
    def bundled(url, expected_hash):
        return tiktoken.load.load_tiktoken_bpe(str(gpt2_ranks_path()), expected_hash)

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", bundled)
    ranks = openai_public.r50k_base()["mergeable_ranks"]
    monkeypatch.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks", lambda **_: ranks)
    spec = openai_public.gpt2()

    gpt2 = get_tokenizer("gpt2")
    assert gpt2.name == spec["name"] == "gpt2"
    assert gpt2._pat_str == spec["pat_str"] == GPT2_PATTERN
    assert gpt2._special_tokens == spec["special_tokens"]
    assert gpt2._mergeable_ranks == spec["mergeable_ranks"]
    assert gpt2.n_vocab == spec["explicit_n_vocab"] == GPT2_VOCAB_SIZE
    assert gpt2.eot_token == GPT2_EOT_ID
    assert get_tokenizer("gpt2") is gpt2


def test_plain_tiktoken_file_loads_with_gpt2_conventions():
    from_file = get_tokenizer(gpt2_ranks_path())  # no .json sidecar beside it
    gpt2 = get_tokenizer("gpt2")
    assert from_file is not gpt2
    assert from_file._pat_str == gpt2._pat_str and from_file._special_tokens == gpt2._special_tokens
    text = "Shall I compare thee to a summer's day?<|endoftext|>  \n"
    assert from_file.encode(text, allowed_special="all") == gpt2.encode(text, allowed_special="all")


# --- round trips -----------------------------------------------------------------------

UNICODE_SAMPLES = [
    "",
    " ",
    "   \n\n\t  \r\n",
    "👩‍👩‍👧‍👦 👍🏽 🇯🇵🏳️‍🌈",  # ZWJ sequences, skin tone, flags
    "東京都の天気は晴れ。北京欢迎你",
    "한국어 한",  # precomposed Hangul and conjoining jamo
    "مرحبا بالعالم שלום",
    "हिन्दी ภาษาไทย",
    "e\u0301 n\u0303 Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇",  # combining marks, zalgo
    "\x00\x01\x1b[31m\x7f\x0b\x0c\x85",  # control characters
    "\u2028\u2029\ufeff\u200b\u00a0",
    "\U0010ffff\ue000\ufffd𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "١٢٣ 4567890123 ½ Ⅻ",
    "don't I'll we've THEY'RE 'tis",
    "a" * 3000,
    "<|endoftext|>",  # as plain text: encode_ordinary treats it as characters
]


def _random_strings():
    rng = random.Random(0)
    valid = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
    from_bytes = [bytes(rng.randrange(256) for _ in range(200)).decode("utf-8", "replace") for _ in range(5)]
    from_code_points = ["".join(chr(rng.choice(valid)) for _ in range(100)) for _ in range(5)]
    return from_bytes + from_code_points


@pytest.mark.parametrize("text", UNICODE_SAMPLES + _random_strings())
def test_round_trip_arbitrary_unicode(encoding, text):
    ids = encoding.encode_ordinary(text)
    assert all(0 <= i < encoding.n_vocab for i in ids)
    assert encoding.decode(ids) == text
    assert encoding.decode_bytes(ids) == text.encode("utf-8")


def test_round_trip_normalization_is_not_applied(encoding):
    # Composed and decomposed forms are different byte strings and must stay different.
    composed = "café"
    decomposed = unicodedata.normalize("NFD", composed)
    assert encoding.encode_ordinary(composed) != encoding.encode_ordinary(decomposed)
    assert encoding.decode(encoding.encode_ordinary(decomposed)) == decomposed


# --- what a merge list implies ---------------------------------------------------------


def test_merges_of_the_textbook_example():
    # aaabdaaabac: aa (4 times) -> Z; then ab and Za tie at 2 and ab (lower ids) wins -> Y;
    # then ZY -> X, giving X d X a c.
    bpe = train_bpe("aaabdaaabac", 256 + 3 + 1)
    assert bpe.merges == ((b"a", b"a"), (b"a", b"b"), (b"aa", b"ab"))
    assert bpe.ranks == {**{bytes([b]): b for b in range(256)}, b"aa": 256, b"ab": 257, b"aaab": 258}
    assert bpe.special_token_ids == {ENDOFTEXT: 259}
    encoding = bpe.encoding()
    assert encoding.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]
    assert encoding.encode("aaab<|endoftext|>", allowed_special="all") == [258, 259]
    assert encoding.n_vocab == 260


def test_training_stops_when_pairs_run_out():
    with pytest.warns(UserWarning, match="ran out of pairs after 7 merges"):
        bpe = train_bpe("aaabdaaabac", 1000)
    # Once every pair occurs once, ties go to the lowest ids: ac (97, 99), then d+aaab, ...
    assert bpe.merges[3:] == (
        (b"a", b"c"),
        (b"d", b"aaab"),
        (b"aaab", b"daaab"),
        (b"aaabdaaab", b"ac"),
    )
    assert bpe.n_vocab == 256 + 7 + 1
    assert bpe.encoding().encode("aaabdaaabac") == [262]


def test_merges_stay_inside_pattern_chunks():
    # Chunks "ab", " ab", " ab": ab (3) first, then " "+"ab" (2); "b " never forms.
    with pytest.warns(UserWarning):
        bpe = train_bpe("ab ab ab", 1000)
    assert bpe.merges == ((b"a", b"b"), (b" ", b"ab"))
    assert bpe.encoding().encode("ab ab ab") == [256, 257, 257]


def test_special_tokens_are_never_merged_into():
    text = ("say<|endoftext|>" * 5) + "<|sep|>".join(["so"] * 5)
    with pytest.warns(UserWarning):
        bpe = train_bpe(text, 1000, special_tokens=(ENDOFTEXT, "<|sep|>"))
    assert set(bpe.ranks) - {bytes([b]) for b in range(256)} == {b"ay", b"say", b"so"}
    assert bpe.special_token_ids == {ENDOFTEXT: 259, "<|sep|>": 260}
    without = train_bpe(text, 260, special_tokens=())
    assert any(b"<|" in token for token in without.ranks)


def test_trainer_matches_textbook_trainer(sample_text):
    text = sample_text[:15_000]
    assert list(train_bpe(text, 256 + 120 + 1).merges) == naive_train(text, 120)


def test_tiktoken_encodes_as_the_merge_list_implies(trained, sample_text):
    encoding = trained.encoding()
    chunks = {m.group() for m in regex.finditer(GPT2_PATTERN, sample_text[:20_000])}
    ranks = trained.ranks
    for chunk in sorted(chunks):
        expected = [ranks[part] for part in apply_merges(chunk.encode(), trained.merges)]
        assert encoding.encode_ordinary(chunk) == expected, chunk


def test_lone_surrogates_train_as_replacement_character():
    bpe = train_bpe("ab\ud800ab\udfff", 256 + 3 + 1)
    # U+FFFD is EF BF BD; the tie between (EF, BF) and (BF, BD) goes to the lower ids.
    assert bpe.merges == ((b"a", b"b"), (b"\xbf", b"\xbd"), (b"\xef", b"\xbf\xbd"))


# --- save and load ---------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, no_tiktoken_cache):
    specials = ("<|endoftext|>", "<|pad|>")
    bpe = train_bpe("the cat sat on the mat. " * 20 + "<|pad|>", 268, special_tokens=specials, pattern=r"\s?\w+|\W")
    path = save_bpe(bpe, tmp_path / "cats.tiktoken")

    assert tiktoken.load.load_tiktoken_bpe(str(path)) == bpe.ranks  # tiktoken's own reader agrees
    meta = json.loads(metadata_path(path).read_text())
    assert meta["pattern"] == r"\s?\w+|\W" and meta["special_tokens"] == {"<|endoftext|>": 266, "<|pad|>": 267}

    loaded, original = get_tokenizer(path), bpe.encoding()
    assert loaded.name == "cats"
    assert loaded._mergeable_ranks == original._mergeable_ranks == bpe.ranks
    assert loaded._special_tokens == original._special_tokens
    assert loaded._pat_str == original._pat_str
    text = "the mat sat<|pad|> on 🐈<|endoftext|>"
    assert loaded.encode(text, allowed_special="all") == original.encode(text, allowed_special="all")
    assert loaded.encode("<|pad|>", allowed_special="all") == [267]
    assert get_tokenizer(str(path))._mergeable_ranks == bpe.ranks


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(text=b"abc", vocab_size=300), TypeError, "text must be a str"),
        (dict(text=None, vocab_size=300), TypeError, "text must be a str"),
        (dict(text="abc", vocab_size=256), ValueError, "vocab_size must be at least 257"),
        (dict(text="abc", vocab_size=257, special_tokens=("<a>", "<b>")), ValueError, "at least 258"),
        (dict(text="abc", vocab_size=300.0), TypeError, "vocab_size must be an int"),
        (dict(text="abc", vocab_size=True), TypeError, "vocab_size must be an int"),
        (dict(text="abc", vocab_size=300, special_tokens=ENDOFTEXT), TypeError, "special_tokens"),
        (dict(text="abc", vocab_size=300, special_tokens=("",)), TypeError, "special_tokens"),
        (dict(text="abc", vocab_size=300, special_tokens=("<a>", "<a>")), ValueError, "duplicates"),
        (dict(text="abc", vocab_size=300, pattern="(unclosed"), ValueError, "pattern is not a valid"),
        (dict(text="abc", vocab_size=300, pattern=3), TypeError, "pattern must be a str"),
        (dict(text="ab cd", vocab_size=300, pattern=r"\p{L}+"), ValueError, "unmatched"),
    ],
)
def test_train_bpe_rejects_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        train_bpe(**kwargs)


def test_bpe_rejects_inconsistent_merges():
    with pytest.raises(ValueError, match=r"merges\[0\]"):
        BPE(merges=((b"ab", b"c"),))
    with pytest.raises(ValueError, match="same token"):
        BPE(merges=((b"a", b"b"), (b"b", b"c"), (b"ab", b"c"), (b"a", b"bc")))


def test_save_bpe_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError, match="bpe must be a BPE"):
        save_bpe({b"a": 0}, tmp_path / "x")
    with pytest.raises(TypeError, match="path"):
        save_bpe(BPE(merges=()), 3)


@pytest.mark.parametrize("name", ["gpt3", "missing/tokenizer.tiktoken"])
def test_get_tokenizer_missing_file(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist; pass 'gpt2'"):
        get_tokenizer(name)


def test_get_tokenizer_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="name_or_path"):
        get_tokenizer(50257)
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        get_tokenizer(tmp_path)  # a directory is read as a model directory


def _ranks_file(lines):
    return b"".join(line + b"\n" for line in lines)


_BYTE_LINES = [base64.b64encode(bytes([b])) + b" %d" % b for b in range(256)]


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "no ranks"),
        (b"\n\n", "no ranks"),
        (_ranks_file(_BYTE_LINES + [b"not*base64 256"]), "line 257 is not"),
        (_ranks_file(_BYTE_LINES + [b"YWI= 2x6"]), "line 257 is not"),
        (_ranks_file(_BYTE_LINES + [b"YWI= 256 7"]), "line 257 is not"),
        (_ranks_file(_BYTE_LINES + [b"YWI="]), "line 257 is not"),
        (_ranks_file(_BYTE_LINES + [b" 256"]), "line 257 is not"),
        (_ranks_file(_BYTE_LINES + [b"YQ== 256"]), "line 257 repeats the token b'a'"),
        (_ranks_file(_BYTE_LINES + [b"YWI= 255"]), "line 257 repeats the rank 255"),
        (_ranks_file(_BYTE_LINES + [b"YWI= 300"]), "without gaps"),
        (_ranks_file(_BYTE_LINES[:100] + [b"YWI= 100"]), "156 single bytes are not tokens"),
        (b"\xff\xfe garbage", "line 1 is not"),
    ],
)
def test_get_tokenizer_rejects_corrupt_ranks(tmp_path, content, match):
    path = tmp_path / "bad.tiktoken"
    path.write_bytes(content)
    with pytest.raises(TokenizerFileError, match=match):
        get_tokenizer(path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda meta: "{not json", "not valid JSON"),
        (lambda meta: json.dumps([1, 2]), "expected an object"),
        (lambda meta: json.dumps({**meta, "extra": 1}), "expected an object"),
        (lambda meta: json.dumps({**meta, "version": 2}), "version 2"),
        (lambda meta: json.dumps({**meta, "ranks_sha256": "0" * 64}), "another ranks file"),
        (lambda meta: json.dumps({**meta, "special_tokens": {ENDOFTEXT: 7}}), r"special token ids must be \[257\]"),
        (lambda meta: json.dumps({**meta, "special_tokens": {ENDOFTEXT: "257"}}), "integer ids"),
        (lambda meta: json.dumps({**meta, "pattern": "(("}), "pattern is not a valid"),
    ],
)
def test_get_tokenizer_rejects_corrupt_sidecar(tmp_path, edit, match):
    path = save_bpe(BPE(merges=((b"a", b"b"),)), tmp_path / "ab.tiktoken")
    meta = json.loads(metadata_path(path).read_text())
    metadata_path(path).write_text(edit(meta))
    with pytest.raises(TokenizerFileError, match=match):
        get_tokenizer(path)
