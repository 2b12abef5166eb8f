"""Calibration sources: what ``--calib SOURCE`` names, parsed, validated, read and hashed.

Syntax of one ``--calib`` value (repeatable; several sources are mixed by weight)::

    LOCATION[@WEIGHT][,KEY=VALUE...]

LOCATION is a file or folder, ``bundled`` (the bundled calibration text), ``hf:NAME``
(a Hugging Face Hub dataset; a bare ``owner/name`` that is not a local path means the
same), or a token file made by ``moepress calib prepare``. Keys: ``weight`` (same as
``@WEIGHT``), ``field`` (JSONL/Parquet/dataset column; default ``text``, else
``messages``), ``mode`` (``pack``: documents concatenated with EOS and cut into
windows, the default; ``truncate``: one document per sample, its first seq-len tokens,
shorter documents skipped), ``split`` (dataset split), ``type`` (force a type), and for
the Hub ``config`` and ``revision``.

Types by extension: ``.txt .md .rst .text`` text (a file is one document; a folder is
every such file under it); ``.jsonl .json`` JSON lines, one document per record (a
string field, or chat ``messages`` rendered with the tokenizer's chat template);
``.parquet``; a folder written by ``datasets``' ``save_to_disk``; ``.safetensors .pt``
with a ``.json`` sidecar: a prepared token file.

A source is read lazily: :class:`Documents` knows how many documents there are and
returns one by index, so sampling touches (and tokenizes) only what it uses.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

from moepress.errors import MoepressError

BUNDLED_CALIB = Path(__file__).resolve().parent / "data" / "calib.txt"

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
TOKEN_SUFFIXES = (".safetensors", ".pt")
TYPES = ("text", "jsonl", "parquet", "dataset", "tokens", "hub")
MODES = ("pack", "truncate")
KEYS = ("weight", "field", "mode", "split", "type", "config", "revision")
AUTO_FIELDS = ("text", "messages")

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT = re.compile(r"^(.*)@([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


@dataclass(frozen=True)
class SourceSpec:
    """One parsed ``--calib`` value."""

    spec: str  # as given
    location: str  # absolute path, or the Hub dataset name
    type: str
    weight: float = 1.0
    field: str | None = None
    mode: str = "pack"
    split: str | None = None
    config: str | None = None
    revision: str | None = None

    @property
    def path(self) -> Path:
        return Path(self.location)

    def describe(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _err(spec: str, what: str) -> MoepressError:
    return MoepressError(f"--calib {spec}: {what}")


def _detect_type(p: Path) -> str | None:
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            return "dataset"
        return "text"
    name = p.name.lower()
    for t, suffixes in (("text", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES),
                        ("tokens", TOKEN_SUFFIXES)):
        if name.endswith(suffixes):
            return t
    return None


def _known_suffix(loc: str) -> bool:
    return loc.lower().endswith(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES + TOKEN_SUFFIXES)


def parse_source(spec: str) -> SourceSpec:
    """Parse and validate one ``--calib`` value (the location must exist; nothing is read yet)."""
    spec = spec.strip()
    if not spec:
        raise MoepressError("--calib: empty source")
    if Path(spec).exists():  # a path that happens to contain ',' or '@'
        loc, opts = spec, []
    else:
        loc, *opts = spec.split(",")
    kv: dict[str, str] = {}
    for o in opts:
        k, sep, v = o.partition("=")
        k = k.strip()
        if not sep or k not in KEYS:
            raise _err(spec, f"unknown option {o!r} (expected KEY=VALUE with KEY one of {', '.join(KEYS)})")
        kv[k] = v.strip()
    weight = 1.0
    m = _WEIGHT.match(loc)
    if m and not Path(loc).exists():
        loc, weight = m.group(1), float(m.group(2))
    if "weight" in kv:
        try:
            weight = float(kv.pop("weight"))
        except ValueError:
            raise _err(spec, "weight must be a number") from None
    if not (weight > 0 and math.isfinite(weight)):
        raise _err(spec, f"weight {weight:g}: expected a positive number")
    mode = kv.pop("mode", "pack")
    if mode not in MODES:
        raise _err(spec, f"mode {mode!r}: expected one of {', '.join(MODES)}")
    forced = kv.pop("type", None)
    if forced is not None and forced not in TYPES:
        raise _err(spec, f"unknown source type {forced!r}: expected one of {', '.join(TYPES)}")

    if loc == "bundled" and not Path(loc).exists():
        loc = str(BUNDLED_CALIB)
    if loc.startswith("hf:") or forced == "hub":
        name = loc[3:] if loc.startswith("hf:") else loc
        return SourceSpec(spec, name, "hub", weight, kv.get("field"), mode, kv.get("split"), kv.get("config"),
                          kv.get("revision"))
    p = Path(loc).expanduser()
    if not p.exists():
        if _HUB_NAME.match(loc) and not _known_suffix(loc) and not loc.startswith("."):
            return SourceSpec(spec, loc, "hub", weight, kv.get("field"), mode, kv.get("split"), kv.get("config"),
                              kv.get("revision"))
        raise _err(spec, f"{loc}: no such file or directory")
    kind = forced or _detect_type(p)
    if kind is None:
        raise _err(spec, f"{p.name}: unknown source type (expected a folder or a file ending in "
                         f"{' '.join(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES + TOKEN_SUFFIXES)}, "
                         f"or type=...)")
    if kind in ("jsonl", "parquet", "tokens") and p.is_dir():
        raise _err(spec, f"{p}: type {kind} needs a file, got a folder")
    for k in ("config", "revision"):
        if k in kv:
            raise _err(spec, f"{k}= applies to Hub datasets only")
    if kind == "tokens" and kv.get("field"):
        raise _err(spec, "field= does not apply to a token file")
    return SourceSpec(spec, str(p.resolve()), kind, weight, kv.get("field"), mode, kv.get("split"))


def parse_sources(specs: tuple[str, ...] | list[str]) -> list[SourceSpec]:
    """All ``--calib`` values; none means the bundled calibration text."""
    return [parse_source(s) for s in specs] if specs else [parse_source(str(BUNDLED_CALIB))]


# ---- content hashes (for the cache key) ------------------------------------------------------

def _file_sha(p: Path, memo: dict | None) -> str:
    st = p.stat()
    key = str(p.resolve())
    if memo is not None:
        hit = memo.get(key)
        if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
            return hit["sha256"]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    d = h.hexdigest()
    if memo is not None:
        memo[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": d}
    return d


def text_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(TEXT_SUFFIXES)
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def content_hash(src: SourceSpec, memo: dict | None = None) -> str | None:
    """sha256 over the bytes a source reads (None for a Hub dataset at a moving revision)."""
    if src.type == "hub":
        if src.revision and re.fullmatch(r"[0-9a-f]{40}", src.revision):
            return hashlib.sha256(f"hub:{src.location}:{src.config}:{src.revision}".encode()).hexdigest()
        return None
    p = src.path
    if p.is_file():
        files = [p] + ([sidecar_path(p)] if src.type == "tokens" and sidecar_path(p).exists() else [])
    elif src.type == "text":
        files = text_files(p)
    else:
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("cache-"))
    h = hashlib.sha256()
    for f in files:
        rel = f.name if f == p else f.relative_to(p if p.is_dir() else p.parent).as_posix()
        h.update(f"{rel}\0{_file_sha(f, memo)}\0".encode())
    return h.hexdigest()


def sidecar_path(p: Path) -> Path:
    """The JSON that describes a prepared token file: ``calib.safetensors`` -> ``calib.safetensors.json``."""
    return p.with_name(p.name + ".json")


# ---- documents ------------------------------------------------------------------------------

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


def _read_utf8(p: Path) -> str:
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MoepressError(f"{p}: not UTF-8 text (invalid byte 0x{e.object[e.start]:02x} at offset {e.start})") \
            from None


class TextDocuments(Documents):
    """Each text file is one document; empty files in a folder are skipped."""

    def __init__(self, src: SourceSpec):
        super().__init__(src)
        files = text_files(src.path)
        if not files:
            raise MoepressError(f"{src.path}: no text files ({' '.join(TEXT_SUFFIXES)}) in this folder")
        self.files = [f for f in files if f.stat().st_size > 0]
        if not self.files:
            what = "empty file" if src.path.is_file() else f"all {len(files)} text files are empty"
            raise MoepressError(f"{src.path}: {what}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> str:
        text = _read_utf8(self.files[i])
        if not text.strip() and self.src.path.is_file():
            raise MoepressError(f"{self.files[i]}: empty file (only whitespace)")
        return text

    def where(self, i: int) -> str:
        return str(self.files[i])


class JsonlDocuments(Documents):
    """One JSON object per non-empty line; line offsets are indexed up front, records parsed on use."""

    def __init__(self, src: SourceSpec):
        super().__init__(src)
        self.offsets: list[tuple[int, int, int]] = []  # (line number, start, end)
        pos = 0
        with open(src.path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    self.offsets.append((n, pos, pos + len(line)))
                pos += len(line)
        if not self.offsets:
            raise MoepressError(f"{src.path}: empty file")
        with open(src.path, "rb") as f:
            if f.read(64).lstrip().startswith(b"["):
                raise MoepressError(f"{src.path}: a JSON array; expected JSON lines (one object per line)")
        first = self._record(0)
        self.field = _pick_field(src, list(first), self.where(0))

    def __len__(self) -> int:
        return len(self.offsets)

    def where(self, i: int) -> str:
        return f"{self.src.path}:{self.offsets[i][0]}"

    def _record(self, i: int) -> dict:
        _, a, b = self.offsets[i]
        with open(self.src.path, "rb") as f:
            f.seek(a)
            raw = f.read(b - a)
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise MoepressError(f"{self.where(i)}: not UTF-8 text (invalid byte at column {e.start + 1})") from None
        except json.JSONDecodeError as e:
            raise MoepressError(f"{self.where(i)}: not a JSON object ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise MoepressError(f"{self.where(i)}: expected a JSON object per line, got {type(rec).__name__}")
        return rec

    def __getitem__(self, i: int):
        rec = self._record(i)
        if self.field not in rec:
            raise MoepressError(f"{self.where(i)}: no field '{self.field}' (fields: {', '.join(rec) or 'none'})")
        return _check_value(rec[self.field], self.where(i), self.field)


class ColumnDocuments(Documents):
    """A column of an Arrow table (Parquet file) or of a ``datasets.Dataset`` (memory-mapped)."""

    def __init__(self, src: SourceSpec, column, n: int, field: str):
        super().__init__(src)
        self.column, self.n, self.field = column, n, field

    def __len__(self) -> int:
        return self.n

    def where(self, i: int) -> str:
        return f"{self.src.location} (row {i})"

    def __getitem__(self, i: int):
        v = self.column[i]
        v = v.as_py() if hasattr(v, "as_py") else v
        if v is None:
            return ""
        return _check_value(v, self.where(i), self.field)


def parquet_documents(src: SourceSpec) -> ColumnDocuments:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(src.path)
    except (pa.ArrowInvalid, OSError) as e:
        raise MoepressError(f"{src.path}: not a Parquet file ({str(e).splitlines()[0]})") from None
    field = _pick_field(src, pf.schema_arrow.names, str(src.path))
    table = pf.read(columns=[field])
    if table.num_rows == 0:
        raise MoepressError(f"{src.path}: no rows")
    return ColumnDocuments(src, table.column(field), table.num_rows, field)


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


def _hub_reachable() -> str | None:
    """None when the Hub looks reachable, else why not (checked fast: no retries, 5 s)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
        return "offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # reachability is the proxy's business
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        return f"cannot reach {host} ({e.strerror or e})"
    return None


def hub_documents(src: SourceSpec, seed: int):
    """A Hub dataset, streamed (nothing is downloaded whole); yields documents in a seeded shuffled order."""
    why = _hub_reachable()
    if why is not None:
        what = "a Hugging Face Hub dataset" if src.spec.startswith("hf:") or ",type=hub" in src.spec else \
            "no such local path, so read as a Hugging Face Hub dataset"
        raise MoepressError(f"--calib {src.spec}: {what}, but {why}; save it where the network allows "
                            f"(datasets save_to_disk, JSONL or Parquet) and pass that path")
    try:
        import datasets

        ds = datasets.load_dataset(src.location, src.config, split=src.split or "train", streaming=True,
                                   revision=src.revision)
        ds = ds.shuffle(seed=seed, buffer_size=10_000)
        it = iter(ds)
        first = next(it)
    except StopIteration:
        raise MoepressError(f"--calib {src.spec}: the dataset is empty") from None
    except Exception as e:
        raise MoepressError(f"--calib {src.spec}: cannot load the Hub dataset "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    field = _pick_field(src, list(first), src.location)

    def gen():
        yield _check_value(first[field], src.location, field)
        for rec in it:
            yield _check_value(rec[field], src.location, field)
    return gen()


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
