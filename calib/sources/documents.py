"""A source's documents by index, read lazily: text files, JSON lines, Parquet, saved datasets."""

from __future__ import annotations

import json
from array import array
from bisect import bisect_right
from itertools import accumulate
from pathlib import Path

from moepress.calib.sources.hashing import text_files
from moepress.calib.sources.spec import AUTO_FIELDS, TEXT_SUFFIXES, SourceSpec
from moepress.errors import MoepressError


class Documents:
    """A source's documents by index: ``len(docs)`` (None when streamed) and ``docs[i]``.

    A document is a ``str`` or a list of chat messages (``[{"role":..., "content":...}]``).
    """

    def __init__(self, src: SourceSpec):
        self.src = src

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int):
        raise NotImplementedError

    def where(self, i: int) -> str:
        return f"{self.src.location} (document {i + 1})"


def _check_value(v, where: str, field: str):
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in v):
        return v
    if isinstance(v, list):  # a list, not chat messages: name the first element that is none
        k, m = next((k, m) for k, m in enumerate(v) if not (isinstance(m, dict) and "role" in m and "content" in m))
        what = f"has no {'role' if 'role' not in m else 'content'} key" if isinstance(m, dict) else \
            f"is a {type(m).__name__}"
        raise MoepressError(f"{where}: field '{field}' element {k} {what}; expected text or chat messages (a list "
                            "of {role, content})")
    raise MoepressError(f"{where}: field '{field}' is a {type(v).__name__}, expected text or chat messages "
                        f"(a list of {{role, content}})")


def _pick_field(src: SourceSpec, columns: list[str], where: str) -> str:
    if src.field is not None:
        if src.field not in columns:
            raise MoepressError(f"{where}: no field '{src.field}' (fields: {', '.join(columns) or 'none'})")
        return src.field
    for f in AUTO_FIELDS:
        if f in columns:
            return f
    raise MoepressError(f"{where}: no 'text' or 'messages' field (fields: {', '.join(columns) or 'none'}); "
                        f"name one with --calib FILE,field=NAME")


# a text file larger than this is read as pieces of about this size (``TextDocuments``): a calibration takes a few
# thousand tokens, and a tokenizer holds many times the size of the text it encodes at once
PIECE_BYTES = 1 << 20


def read_utf8(p: Path, start: int = 0, end: int | None = None) -> str:
    """Bytes [start, end) of p decoded; a decoding error names the file's offset, never its bytes."""
    try:
        with open(p, "rb") as f:
            f.seek(start)
            raw = f.read(-1 if end is None else end - start)
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # the offset only: never echo a file's bytes (it may be any file)
        raise MoepressError(f"{p}: not UTF-8 text (invalid byte at offset {start + e.start})") from None
    if (at := raw.find(b"\0")) >= 0:  # valid UTF-8, yet no text holds NUL: a binary file (a file of zeros)
        raise MoepressError(f"{p}: not text (a NUL byte at offset {start + at}); expected a UTF-8 text file")
    return text


def piece_start(f, at: int, size: int) -> int:
    """Where a piece starting near byte ``at`` starts: just after the first newline at or after ``at`` (within
    PIECE_BYTES), else at the first UTF-8 character start from ``at``, so that every piece decodes alone and
    consecutive pieces tile the file. Found from ``at`` alone: a piece is read without reading those before it."""
    if at <= 0 or at >= size:
        return min(max(at, 0), size)
    f.seek(at - 1)
    buf = f.read(PIECE_BYTES + 1)
    nl = buf.find(b"\n")
    if nl >= 0:
        return at + nl
    k = 1
    while k < len(buf) and buf[k] & 0xC0 == 0x80:  # a UTF-8 continuation byte
        k += 1
    return at - 1 + k


class TextDocuments(Documents):
    """Each text file is one document; empty files in a folder are skipped. With mode=pack, a file over
    PIECE_BYTES is several documents instead, its pieces of about PIECE_BYTES cut at line ends (one is read, and
    tokenized, only when sampling draws it); with mode=truncate, which takes each document's first seq-len tokens,
    such a file is its first piece."""

    def __init__(self, src: SourceSpec):
        super().__init__(src)
        files = text_files(src.path)
        if not files:
            raise MoepressError(f"{src.path}: no text files ({' '.join(TEXT_SUFFIXES)}) in this folder")
        sized = [(f, f.stat().st_size) for f in files]
        self.files = [f for f, n in sized if n > 0]
        if not self.files:
            what = "empty file" if src.path.is_file() else f"all {len(files)} text files are empty"
            raise MoepressError(f"{src.path}: {what}")
        many = src.mode == "pack"
        # (file, piece, pieces of that file, file size)
        self.pieces = [(f, k, m, n) for f, n in sized if n > 0
                       for m in [-(-n // PIECE_BYTES) if many else 1] for k in range(m)]

    def __len__(self) -> int:
        return len(self.pieces)

    def __getitem__(self, i: int) -> str:
        f, k, m, n = self.pieces[i]
        if n <= PIECE_BYTES:
            text = read_utf8(f)
            if not text.strip() and self.src.path.is_file():
                raise MoepressError(f"{f}: empty file (only whitespace)")
            return text
        with open(f, "rb") as fh:
            a = piece_start(fh, k * PIECE_BYTES, n)
            b = piece_start(fh, (k + 1) * PIECE_BYTES, n)  # the file's end for its last piece
        return read_utf8(f, a, b)

    def where(self, i: int) -> str:
        f, k, m, _ = self.pieces[i]
        return str(f) if m == 1 else f"{f} (piece {k + 1} of {m})"


class JsonlDocuments(Documents):
    """One JSON object per non-empty line. Every line is parsed and checked once as it is indexed, so that a bad
    line is refused whichever documents a seed samples; records are parsed again on use, from their offsets."""

    def __init__(self, src: SourceSpec):
        super().__init__(src)
        # each non-empty line's number and start offset, 16 bytes a line (a Python tuple would take ~150)
        self.lines, self.starts = array("q"), array("q")
        self.field: str | None = None
        with open(src.path, "rb") as f:
            head = f.read(64)
        if head.lstrip().startswith(b"["):
            raise MoepressError(f"{src.path}: a JSON array; expected JSON lines (one object per line)")
        if head[:2] == b"\x1f\x8b" or head[:4] == b"\x28\xb5\x2f\xfd":  # gzip, zstd magic numbers
            raise MoepressError(f"{src.path}: gzip / zstd compressed; expected JSON lines as text (decompress it "
                                "first: zcat / zstdcat FILE > FILE.jsonl)")
        pos = 0
        with open(src.path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    self.lines.append(n)
                    self.starts.append(pos)
                    i = len(self.lines) - 1
                    self._value(self._parse(line, i), i)
                pos += len(line)
        if not self.lines:
            raise MoepressError(f"{src.path}: empty file")

    def __len__(self) -> int:
        return len(self.lines)

    def where(self, i: int) -> str:
        return f"{self.src.path}:{self.lines[i]}"

    def _parse(self, raw: bytes, i: int) -> dict:
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise MoepressError(f"{self.where(i)}: not UTF-8 text (invalid byte at column {e.start + 1})") from None
        except json.JSONDecodeError as e:
            raise MoepressError(f"{self.where(i)}: not a JSON object ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise MoepressError(f"{self.where(i)}: expected a JSON object per line, got {type(rec).__name__}")
        return rec

    def _value(self, rec: dict, i: int):
        """Record ``i``'s document (its field picked from the first record)."""
        if self.field is None:
            self.field = _pick_field(self.src, list(rec), self.where(i))
        if self.field not in rec:
            raise MoepressError(f"{self.where(i)}: no field '{self.field}' (fields: {', '.join(rec) or 'none'})")
        if rec[self.field] is None:  # an empty document, as a null in a Parquet / dataset column
            return ""
        return _check_value(rec[self.field], self.where(i), self.field)

    def __getitem__(self, i: int):
        with open(self.src.path, "rb") as f:
            f.seek(self.starts[i])
            raw = f.readline()
        return self._value(self._parse(raw, i), i)


class ColumnDocuments(Documents):
    """A column of an Arrow table (Parquet file) or of a ``datasets.Dataset`` (memory-mapped)."""

    def __init__(self, src: SourceSpec, column, n: int, field: str):
        super().__init__(src)
        self.column, self.n, self.field = column, n, field

    def __len__(self) -> int:
        return self.n

    def where(self, i: int) -> str:
        return f"{self.src.location} (row {i + 1})"  # counted from 1, as a JSONL file's lines are

    def __getitem__(self, i: int):
        v = self.column[i]
        v = v.as_py() if hasattr(v, "as_py") else v
        if v is None:
            return ""
        return _check_value(v, self.where(i), self.field)


def parquet_documents(src: SourceSpec) -> ColumnDocuments:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MoepressError(f"{src.path}: reading Parquet needs the 'pyarrow' package "
                            f"(pip install 'moepress[data]')") from None

    try:
        pf = pq.ParquetFile(src.path)
    except (pa.ArrowInvalid, OSError) as e:
        raise MoepressError(f"{src.path}: not a Parquet file ({str(e).splitlines()[0]})") from None
    field = _pick_field(src, pf.schema_arrow.names, str(src.path))
    if pf.metadata.num_rows == 0:
        raise MoepressError(f"{src.path}: no rows")
    return ColumnDocuments(src, _RowGroups(src, pf, field, pa.ArrowException), pf.metadata.num_rows, field)


class _RowGroups:
    """A Parquet file's column read by row group, as sampling reaches its rows, not whole; the row groups read
    last are kept, up to KEEP_BYTES."""

    KEEP_BYTES = 512 << 20

    def __init__(self, src: SourceSpec, pf, field: str, errors: type[Exception]):
        self.src, self.pf, self.field, self.errors = src, pf, field, errors
        self.ends = list(accumulate(pf.metadata.row_group(k).num_rows for k in range(pf.metadata.num_row_groups)))
        self.kept: dict[int, object] = {}  # row group -> its column, oldest first

    def __getitem__(self, i: int):
        k = bisect_right(self.ends, i)
        col = self.kept.pop(k, None)
        if col is None:
            try:
                col = self.pf.read_row_group(k, columns=[self.field]).column(self.field)
            except (self.errors, OSError) as e:
                raise MoepressError(f"{self.src.path}: cannot read row group {k} ({str(e).splitlines()[0]})") \
                    from None
            while self.kept and sum(c.nbytes for c in self.kept.values()) + col.nbytes > self.KEEP_BYTES:
                self.kept.pop(next(iter(self.kept)))
        self.kept[k] = col
        return col[i - (self.ends[k - 1] if k else 0)]


def dataset_documents(src: SourceSpec) -> ColumnDocuments:
    try:
        import datasets
    except ImportError:
        raise MoepressError(f"{src.path}: reading a saved dataset needs the 'datasets' package "
                            f"(pip install 'moepress[data]')") from None
    try:
        ds = datasets.load_from_disk(str(src.path))
    except Exception as e:  # datasets raises FileNotFoundError / ValueError on a bad folder
        raise MoepressError(f"{src.path}: not a dataset saved with save_to_disk ({str(e).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        split = src.split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
        if split not in ds:
            raise MoepressError(f"{src.path}: pick a split with ,split=NAME (splits: {', '.join(splits)})")
        ds = ds[split]
    elif src.split:
        raise MoepressError(f"{src.path}: a single dataset has no splits (split={src.split} given)")
    field = _pick_field(src, list(ds.column_names), str(src.path))
    if len(ds) == 0:
        raise MoepressError(f"{src.path}: no rows")
    return ColumnDocuments(src, _LazyColumn(ds.select_columns([field]), field), len(ds), field)


class _LazyColumn:
    def __init__(self, ds, field):
        self.ds, self.field = ds, field

    def __getitem__(self, i):
        return self.ds[int(i)][self.field]


def open_documents(src: SourceSpec) -> Documents:
    if src.type == "text":
        return TextDocuments(src)
    if src.type == "jsonl":
        return JsonlDocuments(src)
    if src.type == "parquet":
        return parquet_documents(src)
    if src.type == "dataset":
        return dataset_documents(src)
    raise ValueError(src.type)
