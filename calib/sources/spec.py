"""Parsing and validating ``--calib`` values (the syntax is in :mod:`moepress.calib.sources`)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from moepress.errors import MoepressError

BUNDLED_CALIB = Path(__file__).resolve().parent.parent / "data" / "calib.txt"

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
MAX_WEIGHT = 1e9  # a source's @W / weight= (relative to the other sources')


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


def _options(spec: str) -> tuple[str, dict[str, str]]:
    """The location and its KEY=VALUE options; an unknown key or one given twice with two values refused."""
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
        if k in kv and kv[k] != v.strip():  # as a CLI option given twice: the last one would win unseen
            raise _err(spec, f"{k}= given twice ({kv[k]!r}, {v.strip()!r}); expected one value")
        kv[k] = v.strip()
    return loc, kv


def _weight(spec: str, loc: str, kv: dict[str, str]) -> tuple[str, float]:
    """The location without its ``@W`` suffix and the source's weight (``@W`` or ``weight=``, not both)."""
    weight = 1.0
    m = _WEIGHT.match(loc)
    if m and not Path(loc).exists():
        loc, weight = m.group(1), float(m.group(2))
    elif "@" in loc and not Path(loc).exists() and (Path(base := loc.rpartition("@")[0]).exists() or
                                                    base == "bundled" or base.startswith("hf:")):
        # FILE@-1, bundled@nan, hf:NAME@abc: a weight that is not a positive number, not a missing file
        raise _err(spec, f"weight {loc.rpartition('@')[2]!r}: expected a positive number")
    if "weight" in kv:
        try:
            w = float(kv.pop("weight"))
        except ValueError:
            raise _err(spec, "weight must be a number") from None
        if m and w != weight:
            raise _err(spec, f"weight given twice (@{weight:g}, weight={w:g}); expected one value")
        weight = w
    if not 0 < weight <= MAX_WEIGHT:  # relative weights: a larger one would only overflow the split's products
        raise _err(spec, f"weight {weight:g}: expected a positive number up to {MAX_WEIGHT:g}")
    return loc, weight


def _local_kind(spec: str, p: Path, forced: str | None, kv: dict[str, str]) -> str:
    """The type of a local source, and the options that do not apply to it refused."""
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
    if kind in ("tokens", "text") and kv.get("field"):
        raise _err(spec, f"field= applies to JSON lines, Parquet and datasets, not a {kind} "
                         f"{'file' if p.is_file() else 'folder'}")
    if kind != "dataset" and kv.get("split"):
        raise _err(spec, "split= applies to saved and Hub datasets only")
    return kind


def parse_source(spec: str) -> SourceSpec:
    """Parse and validate one ``--calib`` value (the location must exist; nothing is read yet)."""
    spec = spec.strip()
    if not spec:
        raise MoepressError("--calib: empty source")
    loc, kv = _options(spec)
    loc, weight = _weight(spec, loc, kv)
    if not loc.strip():  # '@1', ':mode=doc': else the current directory, read as text
        raise _err(spec, "no location before its weight or options; expected a file, folder, dataset or bundled")
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
    kind = _local_kind(spec, p, forced, kv)
    return SourceSpec(spec, str(p.resolve()), kind, weight, kv.get("field"), mode, kv.get("split"))


def parse_sources(specs: tuple[str, ...] | list[str]) -> list[SourceSpec]:
    """All ``--calib`` values; none means the bundled calibration text. A source named twice (its samples drawn
    twice, overlapping) is refused: its weight says how much of it to take."""
    out = [parse_source(s) for s in specs] if specs else [parse_source(str(BUNDLED_CALIB))]
    seen: dict[tuple, SourceSpec] = {}
    for s in out:
        same = (s.location, s.type, s.field, s.mode, s.split, s.config, s.revision)
        if same in seen:
            raise _err(s.spec, f"the same source as --calib {seen[same].spec}; expected each source once (its "
                               "weight sets its share)")
        seen[same] = s
    return out


def local_paths(specs: tuple[str, ...] | list[str]) -> list[Path]:
    """The files and folders the ``--calib`` values read (not the Hub's): a stage's inputs beside its model, which
    its output may not equal, sit inside or contain (``-o`` over them read the output back as calibration data
    next time, or ``--force`` deleted them before they were read)."""
    return [s.path for s in parse_sources(specs) if s.type != "hub" and s.path.exists()]


def refuse_output_over(out, paths: list[Path], flag: str = "--calib") -> None:
    """One line where the output ``out`` is, sits inside or contains one of the local calibration sources
    ``paths`` (:func:`local_paths`; ``flag``: how the user named them): the next run would read the output as
    calibration data, and --force deleted the source."""
    from moepress.outputs import refuse_overlap

    refuse_overlap(out, paths, what=f"the {flag} source",
                   why="the calibration data (the next run would read the output as calibration data)")
