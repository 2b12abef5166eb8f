"""A large text file is calibrated on by pieces: what sampling reads is bounded by what it draws, not the file.

A corpus file of a few hundred MB was read and tokenized whole for the few thousand tokens a calibration takes
(a 366 MB file: 24 GB peak RSS, 108 s); ``check``'s evaluation text likewise, for its first windows.
"""

from __future__ import annotations

import random

import pytest

from moepress import models
from moepress.calib import data as data_mod
from moepress.calib import sampling
from moepress.calib.sources import documents as docs_mod
from moepress.calib.sources import parse_source
from moepress.calib.tokenizer import load_tokenizer
from moepress.errors import MoepressError

MODEL = models.resolve("tiny-mixtral")


def _text(n_lines: int, seed: int = 0) -> str:
    """Lines of varying length, some with multi-byte characters, one far longer than the others."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "déjà", "naïve", "東京", "数据", "😀", "omega", "x"]
    lines = [" ".join(rng.choices(words, k=rng.randint(1, 8))) for _ in range(n_lines)]
    lines[n_lines // 2] = "".join(rng.choices(words, k=200))  # no newline for ~1 KB
    return "\n".join(lines) + "\n"


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of 97 bytes, so that a small file has many (and a line longer than a piece)."""
    monkeypatch.setattr(docs_mod, "PIECE_BYTES", 97)
    monkeypatch.setattr(data_mod, "PIECE_BYTES", 97)


def test_pieces_tile_the_file_and_end_at_line_ends(tmp_path, small_pieces):
    text = _text(400)
    p = tmp_path / "corpus.txt"
    p.write_text(text, encoding="utf-8")
    docs = docs_mod.TextDocuments(parse_source(str(p)))
    pieces = [docs[i] for i in range(len(docs))]
    assert len(pieces) == -(-len(text.encode()) // 97)
    assert "".join(pieces) == text  # every byte once, in order, each piece decoded alone
    long_line = text.splitlines()[200]
    ends = [x for x in pieces if x and not x.endswith("\n")]
    assert ends and all(x in long_line for x in ends)  # only a line longer than a piece is cut mid-line
    assert docs.where(3) == f"{p} (piece 4 of {len(docs)})"


def test_truncate_takes_a_large_file_as_one_document_its_first_piece(tmp_path, small_pieces):
    text = _text(400)
    p = tmp_path / "corpus.txt"
    p.write_text(text, encoding="utf-8")
    docs = docs_mod.TextDocuments(parse_source(f"{p},mode=truncate"))
    raw = text.encode()
    assert len(docs) == 1 and docs[0] == raw[:raw.index(b"\n", 96) + 1].decode()  # through the line holding byte 97


def test_an_invalid_byte_in_a_piece_names_its_offset_in_the_file(tmp_path, small_pieces):
    raw = bytearray(_text(400).encode())
    at = len(raw) * 2 // 3
    while raw[at] & 0xC0 == 0x80 or raw[at] == 0x0A:  # an ASCII or leading byte, not a newline
        at += 1
    raw[at] = 0xFF
    p = tmp_path / "corpus.txt"
    p.write_bytes(bytes(raw))
    docs = docs_mod.TextDocuments(parse_source(str(p)))
    with pytest.raises(MoepressError, match=f"not UTF-8 text \\(invalid byte at offset {at}\\)"):
        [docs[i] for i in range(len(docs))]


def test_a_large_file_is_tokenized_by_the_pieces_drawn_only(tmp_path, monkeypatch):
    """A file of ~5 MiB (~4M tokens) at the real piece size: 8 x 64 tokens take the first tokens of a few pieces
    (pack's cap spreads them), tokenized from prefixes of the pieces, never the whole file."""
    p = tmp_path / "corpus.txt"
    p.write_text(_text(200_000), encoding="utf-8")
    tokenized = []
    real = sampling._encode
    monkeypatch.setattr(sampling, "_encode", lambda tok, texts, sp: tokenized.extend(texts) or real(tok, texts, sp))
    seen = set()
    for seed in (0, 1):
        tokenized.clear()
        cs = data_mod.calibration_set(MODEL, (str(p),), num_samples=8, seq_len=64, seed=seed, cache=False)
        info = cs.meta["sources"][0]
        assert cs.input_ids.shape == (8, 64)
        assert info["documents"] == -(-p.stat().st_size // docs_mod.PIECE_BYTES) == 5
        assert 2 <= info["documents_used"] <= 5 and 8 * 64 <= info["tokens_read"] <= 8 * 64 + 64, info
        assert sum(map(len, tokenized)) <= 5 * 64 * 4 * sampling.PREFIX_CHARS < p.stat().st_size / 100
        seen.add(tuple(cs.input_ids[0].tolist()))
    assert len(seen) == 2  # seeds draw other pieces


def test_eval_windows_of_a_large_file_are_the_whole_texts_first_tokens(tmp_path, monkeypatch):
    """check's evaluation text: its first windows, tokenized from a prefix that grows until it holds them."""
    monkeypatch.setattr(data_mod, "PIECE_BYTES", 1024)
    p = tmp_path / "eval.txt"
    p.write_text(_text(3000, seed=1), encoding="utf-8")
    ids = load_tokenizer(MODEL)(p.read_text(encoding="utf-8"), verbose=False)["input_ids"]
    assert len(ids) > 40 * 64 + 1000  # the prefix grows past its first cuts and stops before the end
    calls = []
    real = data_mod.read_utf8
    monkeypatch.setattr(data_mod, "read_utf8", lambda *a: calls.append(a) or real(*a))
    rows = data_mod.eval_batches(MODEL, p, seq_len=64, max_windows=40)
    assert [r.tolist() for b in rows for r in b] == [ids[i * 64:(i + 1) * 64] for i in range(40)]
    assert len(calls) >= 2 and calls[-1][2] < p.stat().st_size
    # all windows: the whole text, as before
    rows = data_mod.eval_batches(MODEL, p, seq_len=64)
    assert sum(b.shape[0] for b in rows) == len(ids) // 64


def test_chunks_of_long_documents_hold_one_document():
    """Documents are tokenized in growing chunks (4, 16, ...), a chunk cut short once it holds CHUNK_CHARS."""
    big, small = "a" * sampling.CHUNK_CHARS, "b" * 10
    chunks = list(sampling.chunks((f"d{i}", big) for i in range(3)))
    assert [len(c) for c in chunks] == [1, 1, 1]
    chunks = list(sampling.chunks((f"d{i}", small) for i in range(30)))
    assert [len(c) for c in chunks] == [4, 16, 10]
    chat = [{"role": "user", "content": big}]
    assert [len(c) for c in sampling.chunks([("c", chat), ("s", small)])] == [1, 1]


@pytest.fixture
def long_docs(monkeypatch):
    """Documents over 1500 characters are long (tokenized by parts)."""
    monkeypatch.setattr(sampling, "LONG_CHARS", 1500)


def _record_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "x", "river", "stone"]
    return "\n".join(" ".join(rng.choices(words, k=9)) for _ in range(n_words // 9)) + "\n"


def _jsonl(tmp_path, texts) -> str:
    import json

    p = tmp_path / "data.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(p)


def test_a_long_record_is_tokenized_by_parts_in_pack_mode(tmp_path, long_docs):
    """One record of ~60k characters: 2 x 64 tokens read one part (~1500 characters), drawn at random by seed;
    each sample is text of the record (decoded, a substring of it)."""
    text = _record_text(9000, 0)
    src = _jsonl(tmp_path, [text])
    whole = len(load_tokenizer(MODEL)(text, verbose=False)["input_ids"])
    tok = load_tokenizer(MODEL)
    starts = set()
    for seed in range(4):
        cs = data_mod.calibration_set(MODEL, (src,), num_samples=2, seq_len=64, seed=seed, cache=False)
        info = cs.meta["sources"][0]
        assert 128 <= info["tokens_read"] <= whole / 20, (info, whole)
        for row in cs.input_ids:
            assert tok.decode(row.tolist()) in text
        starts.add(text.index(tok.decode(cs.input_ids[0].tolist())) // 1500)
    assert len(starts) >= 2  # other parts at other seeds


def test_a_long_record_in_truncate_mode_is_its_first_tokens(tmp_path, long_docs):
    text = _record_text(9000, 1)
    src = _jsonl(tmp_path, [text, _record_text(900, 2)])
    ids = load_tokenizer(MODEL)(text, verbose=False)["input_ids"]  # with the special tokens, as truncate takes
    short = load_tokenizer(MODEL)(_record_text(900, 2), verbose=False)["input_ids"]
    for seq_len in (64, 500):  # 500: more than the first part holds, so the whole record is tokenized
        cs = data_mod.calibration_set(MODEL, (f"{src},mode=truncate",), num_samples=1, seq_len=seq_len, seed=0,
                                      cache=False)
        rows = [r.tolist() for r in cs.input_ids]
        assert rows == [ids[:seq_len]] or rows == [short[:seq_len]], rows
    cs = data_mod.calibration_set(MODEL, (f"{src},mode=truncate",), num_samples=2, seq_len=64, seed=0, cache=False)
    assert sorted(r.tolist() for r in cs.input_ids) == sorted([ids[:64], short[:64]])
    assert cs.meta["sources"][0]["tokens_read"] < len(ids)  # the long record: its first part only


def test_parquet_rows_are_read_by_their_row_group(tmp_path, monkeypatch):
    """Each row read is the table's row (pyarrow's own read of the whole column), from its row group alone."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"row {i} " + "word " * (i % 7) for i in range(1000)]
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": texts, "n": list(range(1000))}), p, row_group_size=64)
    docs = docs_mod.open_documents(parse_source(str(p)))
    read = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, k, **kw: read.append(k) or real(self, k, **kw))
    whole = pq.read_table(p, columns=["text"]).column("text").to_pylist()
    for i in (0, 63, 64, 999, 500, 65):
        assert docs[i] == whole[i]
    assert read == [0, 1, 15, 7]  # row groups of 64 rows: 0, 0, 1, 15, 7, 1 (kept)
    assert len(docs) == 1000 and docs.where(999) == f"{p} (row 1000)"


def test_a_compressed_jsonl_is_refused_in_one_line(tmp_path):
    import gzip

    p = tmp_path / "d.jsonl"
    p.write_bytes(gzip.compress(b'{"text": "hello"}\n'))
    with pytest.raises(MoepressError, match=r"d\.jsonl: gzip / zstd compressed; expected JSON lines as text"):
        docs_mod.open_documents(parse_source(str(p)))


def test_the_jsonl_index_takes_16_bytes_a_record(tmp_path):
    import sys

    p = tmp_path / "d.jsonl"
    p.write_text("".join(f'{{"text": "r{i}"}}\n' + ("\n" if i % 3 == 0 else "") for i in range(100_000)))
    docs = docs_mod.open_documents(parse_source(str(p)))
    assert len(docs) == 100_000
    assert sys.getsizeof(docs.lines) + sys.getsizeof(docs.starts) < 17 * 100_000
    assert docs[99_999] == "r99999" and docs.where(4) == f"{p}:7"  # blank lines after records 0 and 3


@pytest.mark.parametrize("flags", [(), ("--json",), ("--quiet",)])
def test_a_large_source_is_named_before_it_is_read(cli_run, tmp_path, monkeypatch, flags):
    """Hashing a corpus of gigabytes and checking every record of a JSONL take a while with nothing else on the
    screen: the source is named first (as a JSON event with --json, not at all with --quiet)."""
    import json

    monkeypatch.setattr(data_mod, "LARGE_SOURCE", 1000)
    src = _jsonl(tmp_path, [_record_text(900, k) for k in range(3)])
    r = cli_run("prune", "tiny-mixtral", "-o", tmp_path / "p", "--method", "frequency", "--ratio", "0.25",
                "--calib", src, "--num-samples", "4", "--seq-len", "32", *flags)
    assert r.exit_code == 0, r.output
    said = [ln for ln in r.stderr.splitlines() if "calibration: reading" in ln]
    if flags == ("--quiet",):
        assert not said
    elif flags == ("--json",):
        assert len(said) == 1 and json.loads(said[0])["event"] == "info", said
    else:
        assert said == [f"calibration: reading {src} (0.0 GB): hashed for the calibration cache's key (remembered "
                        "while the file is unchanged), every record checked"], said


def test_a_source_too_small_for_its_share_is_refused_before_a_large_one_is_read(tmp_path, monkeypatch):
    import json

    big, tiny = tmp_path / "big.jsonl", tmp_path / "tiny.jsonl"
    big.write_text("".join(json.dumps({"text": _record_text(900, k)}) + "\n" for k in range(300)))
    tiny.write_text("".join(json.dumps({"text": f"record {k}, a few words"}) + "\n" for k in range(3)))
    opened = []
    real = data_mod.open_documents
    monkeypatch.setattr(data_mod, "open_documents", lambda s: opened.append(s.path.name) or real(s))
    with pytest.raises(MoepressError, match="tiny.jsonl: .* fewer than one sample"):
        data_mod.calibration_set(MODEL, (f"{big}@0.9", f"{tiny}@0.1"), num_samples=16, seq_len=64, cache=False)
    assert opened == ["tiny.jsonl"]


def test_the_order_sources_are_read_in_changes_no_sample(tmp_path, monkeypatch):
    import json

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": _record_text(200, k)}) + "\n" for k in range(40)))
    b.write_text("".join(json.dumps({"text": _record_text(300, 100 + k)}) + "\n" for k in range(40)))
    args = ((f"{a}@0.5", f"{b}@0.5"),)
    first = data_mod.calibration_set(MODEL, *args, num_samples=8, seq_len=64, seed=2, cache=False)
    monkeypatch.setattr(data_mod, "_read_cost", lambda s: -data_mod.Path(s.path).stat().st_size)  # largest first
    second = data_mod.calibration_set(MODEL, *args, num_samples=8, seq_len=64, seed=2, cache=False)
    assert first.input_ids.equal(second.input_ids) and first.source.equal(second.source)
    assert set(first.source.tolist()) == {0, 1}
