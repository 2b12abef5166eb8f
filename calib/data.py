"""Calibration and evaluation text -> token batches.

``calibration_batches(model_dir, sources, num_samples, seq_len, seed)`` is the one entry
point every stage uses: sources (see :mod:`moepress.calib.sources` for the ``--calib``
syntax) are tokenized with the model's tokenizer, sampled by seed, mixed by weight, and
cached on disk (:mod:`moepress.calib.cache`) keyed by tokenizer, sources and parameters.

Sampling, per source (weights split ``num_samples`` by largest remainder):

* ``pack``: documents in a seeded random order are tokenized (no special tokens) and
  concatenated with EOS after each until the stream holds enough tokens for the source's
  share, each giving at most its first 1/16 of them, or one sample's worth where fewer
  than 16 samples are drawn (the cap doubled where the source runs out first); the stream
  is cut into ``seq_len`` windows and the samples drawn from them by seed. A single
  document (the bundled text) gives random windows of all of it.
* ``truncate``: documents in a seeded random order, tokenized with the tokenizer's
  special tokens (chat documents through the chat template), each one sample of its first
  ``seq_len`` tokens; documents shorter than ``seq_len`` are skipped.

With several sources the samples are shuffled together by seed. Both modes (:mod:`moepress.calib.sampling`)
tokenize documents in growing chunks and stop at the document that completes the samples; a document over
about 1M characters is tokenized by parts (pack: in a seeded random order, until the samples are complete;
truncate: its first part), and a text file over 1 MiB is read as pieces (:mod:`moepress.calib.sources`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moepress.calib import cache as cache_mod
from moepress.calib.cache import load_token_file
from moepress.calib.model_limits import check_embedding_rows, check_positions
from moepress.calib.sampling import CUT_MARGIN, pack, truncate
from moepress.calib.sources import (
    PIECE_BYTES,
    SourceSpec,
    content_hash,
    hub_documents,
    open_documents,
    parse_sources,
    piece_start,
    read_utf8,
    sidecar_path,
)
from moepress.calib.tokenizer import load_tokenizer, needs_remote_code, tokenizer_fingerprint
from moepress.codeid import code_id
from moepress.errors import MoepressError
from moepress.progress import QUIET, Progress

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_EVAL = DATA_DIR / "eval.txt"
# The first prefix of an evaluation text tokenized for ``need`` tokens: English runs about 4 bytes per token in a
# BPE vocabulary; twice that, so most texts need one prefix (a shorter one is grown x4).
PREFIX_BYTES_PER_TOKEN, MIN_PREFIX_BYTES = 8, 4096


def read_text(path: str | Path) -> str:
    p = Path(path)
    try:
        return read_utf8(p)  # UTF-8 and no NUL byte, as calibration text
    except FileNotFoundError:
        raise MoepressError(f"{p}: file not found") from None


def windows(ids: list[int] | torch.Tensor, seq_len: int, max_windows: int | None = None,
            batch_size: int = 8, source: str | Path = "text") -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of seq_len tokens, grouped into [B, S] batches (``source``: the
    text's name, for the error)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise MoepressError(f"{source}: {ids.numel()} tokens, fewer than one sample of --seq-len {seq_len}")
    rows = ids[: n * seq_len].view(n, seq_len)
    return list(rows.split(batch_size))


def eval_batches(model_dir: str | Path, text_path: str | Path = DEFAULT_EVAL, seq_len: int = 256,
                 max_windows: int | None = None, trust_remote_code: bool = False) -> list[torch.Tensor]:
    check_positions(model_dir, seq_len)
    tok = load_tokenizer(model_dir, trust_remote_code)
    need = None if max_windows is None else max_windows * seq_len
    return windows(_leading_tokens(tok, text_path, need), seq_len, max_windows, source=text_path)


def _leading_tokens(tok, path: str | Path, need: int | None) -> list[int]:
    """The text's tokens, or its first ``need`` of them: a longer file is tokenized as growing prefixes cut at a
    line end, from about PREFIX_BYTES_PER_TOKEN bytes per token needed (at most PIECE_BYTES) and x4 each time,
    until one gives ``need`` tokens and a margin, not whole for a few windows."""
    p = Path(path)
    size = p.stat().st_size if p.is_file() else 0
    end = size if need is None else min(PIECE_BYTES, max(MIN_PREFIX_BYTES, PREFIX_BYTES_PER_TOKEN * need))
    if size <= end:
        return tok(read_text(p), verbose=False)["input_ids"]
    if size <= PIECE_BYTES:
        read_text(p)  # read whole, a text under a piece is checked whole (UTF-8, no NUL byte); a prefix is tokenized
    while True:
        with open(p, "rb") as f:
            cut = piece_start(f, end, size)
        ids = tok(read_utf8(p, 0, cut), verbose=False)["input_ids"]
        if cut >= size:
            return ids
        if len(ids) >= need + CUT_MARGIN:
            return ids[:need]
        end *= 4


# ---- calibration sets ------------------------------------------------------------------------

@dataclass
class CalibSet:
    """Calibration samples: token ids [N, S], the source index of each, and what made them."""

    input_ids: torch.Tensor
    source: torch.Tensor
    meta: dict = field(default_factory=dict)
    cached: bool = False  # loaded from the cache rather than built

    def batches(self, batch_size: int = 8) -> list[torch.Tensor]:
        if batch_size < 1:
            raise MoepressError(f"--batch-size {batch_size}: expected a positive number")
        return split_rows(self.input_ids, batch_size)


def split_rows(rows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``rows`` in batches of ``batch_size`` (the last shorter); a batch size past the rows is all of them
    (torch.split takes a C long: 2**63 overflowed)."""
    return list(rows.split(min(batch_size, max(1, rows.shape[0]))))


def allocate(n: int, weights: list[float]) -> list[int]:
    """Split n samples by weight: floors, then the remainder to the largest fractions (ties: first)."""
    total = sum(weights)
    raw = [n * w / total for w in weights]
    out = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (-(raw[i] - out[i]), i))[: n - sum(out)]:
        out[i] += 1
    return out


def _sample_source(tok, src: SourceSpec, n: int, seq_len: int, seed: int, index: int,
                   tokenizer_sha: str) -> tuple[torch.Tensor, dict]:
    """n samples [n, seq_len] from one source, and what was used."""
    info = {"samples": n}
    if src.type == "tokens":
        return _prepared_samples(src, n, seq_len, tokenizer_sha, info)
    if n == 0:
        return torch.empty(0, seq_len, dtype=torch.long), {**info, "documents_used": 0}

    docs = hub_documents(src, seed + index) if src.type == "hub" else open_documents(src)
    g_docs = torch.Generator().manual_seed(seed + index)
    g_pick = torch.Generator().manual_seed(seed + index)
    sample = pack if src.mode == "pack" else truncate
    out, used, total = sample(tok, src, docs, n, seq_len, g_docs, g_pick)
    n_docs = len(docs) if hasattr(docs, "__len__") else None
    return out, {**info, "documents": n_docs, "documents_used": used, "tokens_read": total}


def _prepared_samples(src: SourceSpec, n: int, seq_len: int, tokenizer_sha: str,
                      info: dict) -> tuple[torch.Tensor, dict]:
    """The first n samples of a token file made by ``moepress calib prepare``."""
    ids, _, side = load_token_file(src.path)
    made_by = side.get("tokenizer") if isinstance(side.get("tokenizer"), dict) else {}
    if made_by.get("sha256") != tokenizer_sha:
        raise MoepressError(f"{src.path}: prepared with another tokenizer than this model's, or under other "
                            f"transformers / tokenizers versions (made for {made_by.get('model', '?')}; the token "
                            "ids depend on both): prepare it again with `moepress calib prepare`")
    if ids.shape[1] != seq_len or ids.shape[0] < n:  # both named at once: the defaults match neither, often
        raise MoepressError(f"{src.path}: holds {ids.shape[0]} samples of {ids.shape[1]} tokens; --num-samples {n} "
                            f"--seq-len {seq_len} asked (run with --seq-len {ids.shape[1]} --num-samples "
                            f"{min(n, ids.shape[0])})")
    # what the token file was sampled from, transitively: a token file prepared from another one is still that
    # text's data (read_hashes: check's in-sample note)
    origin = _origins(side.get("sources"))
    return ids[:n], {**info, "documents": int(ids.shape[0]), "documents_used": n, "from_sha256": sorted(origin),
                     "seed": side.get("seed")}


def _origins(made) -> set[str]:
    """The sha256 of the sources a token file's sidecar lists, and of what those were prepared from."""
    made = [x for x in made or [] if isinstance(x, dict)]
    out = {x["sha256"] for x in made if isinstance(x.get("sha256"), str)}
    return out | {h for x in made for h in x.get("from_sha256") or [] if isinstance(h, str)}


def _check_params(num_samples: int, seq_len: int) -> None:
    if num_samples < 1:
        raise MoepressError(f"--num-samples {num_samples}: expected a positive number")
    if seq_len < 2:
        raise MoepressError(f"--seq-len {seq_len}: expected at least 2")


def source_hashes(sources: tuple[str, ...] | list[str]) -> dict[str, str | None]:
    """sha256 of what each ``--calib`` source reads (none: the bundled text), keyed by the source as given,
    memoised in the cache like :func:`calibration_set`'s."""
    memo = cache_mod.load_hash_memo()
    before = dict(memo)
    out = {s.spec: content_hash(s, memo) for s in parse_sources(tuple(sources))}
    if memo != before:
        cache_mod.save_hash_memo(memo)
    return out


def read_hashes(sources: tuple[str, ...] | list[str]) -> set[str]:
    """The sha256 of what each source reads and, for a token file, of the sources its sidecar says it was
    sampled from: a token file prepared from a text file and that text file are the same data."""
    out = {h for h in source_hashes(sources).values() if h}
    for s in parse_sources(tuple(sources)):
        if s.type != "tokens":
            continue
        try:
            side = json.loads(sidecar_path(s.path).read_text())
        except (OSError, ValueError):
            continue
        out |= _origins(side.get("sources") if isinstance(side, dict) else None)
    return out


def calibration_inputs(sources: tuple[str, ...] | list[str], calibrated: bool = True) -> dict:
    """A calibrated stage's manifest entry for its calibration data: the sha256 of what each source reads, a
    token file's own sources included (``check`` warns when its own data is among them: its figures would be
    in-sample)."""
    if not calibrated:
        return {}
    return {"calibration_sha256": sorted(read_hashes(sources))}


# a local source at least this large is named before it is read: hashing it (for the cache key) and, for JSON lines,
# checking every record take a while with nothing else to show
LARGE_SOURCE = 256 << 20


def _read_cost(s: SourceSpec) -> tuple[int, int]:
    """The order sources are sampled in: files smallest first, then folders and datasets, the Hub last, so that a
    source too small for its share is refused before a large one is indexed and tokenized (every source is hashed
    first, for the cache key; each source's samples come from its own seeded generators: the order changes none)."""
    if s.type == "hub":
        return (2, 0)
    return (0, s.path.stat().st_size) if s.path.is_file() else (1, 0)


def _say_large(specs: list[SourceSpec], progress: Progress) -> None:
    for s in specs:
        size = s.path.stat().st_size if s.type not in ("hub", "tokens") and s.path.is_file() else 0
        if size >= LARGE_SOURCE:
            every = ", every record checked" if s.type == "jsonl" else ""
            progress.info(f"calibration: reading {s.path} ({size / 1e9:.1f} GB): hashed for the calibration "
                          f"cache's key (remembered while the file is unchanged){every}")


def calibration_set(model_dir: str | Path, sources: tuple[str, ...] | list[str] = (), num_samples: int = 64,
                    seq_len: int = 256, seed: int = 0, trust_remote_code: bool = False, *,
                    cache: bool = True, progress: Progress = QUIET) -> CalibSet:
    """The calibration samples for ``model_dir``'s tokenizer, from the cache when it holds them."""
    _check_params(num_samples, seq_len)
    check_positions(model_dir, seq_len)
    model_dir = Path(model_dir)
    specs = parse_sources(tuple(sources))
    _say_large(specs, progress)
    if needs_remote_code(model_dir) and not trust_remote_code:
        raise MoepressError(f"{model_dir}: the tokenizer needs its own Python code; "
                            f"pass --trust-remote-code to allow it")
    memo = cache_mod.load_hash_memo() if cache else {}
    before = dict(memo)
    tok_fp = tokenizer_fingerprint(model_dir, memo)
    hashes = [content_hash(s, memo) for s in specs]
    if cache and memo != before:
        cache_mod.save_hash_memo(memo)
    key_fields = {"tokenizer": tok_fp["sha256"], "num_samples": num_samples, "seq_len": seq_len, "seed": seed,
                  "sources": [{**s.describe(), "spec": None, "location": None, "sha256": h}
                              for s, h in zip(specs, hashes, strict=True)]}
    cacheable = cache and all(h is not None for h in hashes) and not all(s.type == "tokens" for s in specs)
    key = cache_mod.cache_key(key_fields)
    if cacheable:
        hit = cache_mod.cache_get(key)
        if hit is not None and tuple(hit[0].shape) == (num_samples, seq_len):  # the key covers both: a bug's guard
            ids, src, side = hit
            check_embedding_rows(model_dir, ids, src, specs)
            return CalibSet(ids, src, _as_asked(side, specs, model_dir), cached=True)

    tok = load_tokenizer(model_dir, trust_remote_code)
    counts = allocate(num_samples, [s.weight for s in specs])
    drawn = {i: _sample_source(tok, specs[i], counts[i], seq_len, seed, i, tok_fp["sha256"])
             for i in sorted(range(len(specs)), key=lambda i: _read_cost(specs[i]))}
    parts = [drawn[i][0] for i in range(len(specs))]
    infos = [{**s.describe(), "sha256": hashes[i], **drawn[i][1]} for i, s in enumerate(specs)]
    ids = torch.cat(parts)
    src = torch.cat([torch.full((p.shape[0],), i, dtype=torch.long) for i, p in enumerate(parts)])
    if len(specs) > 1:
        perm = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(seed))
        ids, src = ids[perm], src[perm]
    vocab = len(tok)
    _refuse_out_of_vocab(ids, src, specs, vocab)
    check_embedding_rows(model_dir, ids, src, specs)
    if len(specs) == 1 and specs[0].type == "tokens":  # its first rows, whatever --seed: the file's own seed drew them
        seed = infos[0].get("seed")
    meta = {"key": key, "num_samples": num_samples, "seq_len": seq_len, "seed": seed,
            "tokens": int(ids.numel()),
            "tokenizer": {**tok_fp, "model": str(model_dir), "eos_token_id": tok.eos_token_id, "vocab": vocab},
            "sources": infos, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "moepress": code_id()}
    if cacheable:
        cache_mod.cache_put(key, ids, src, meta)
    return CalibSet(ids, src, meta)


def _refuse_out_of_vocab(ids: torch.Tensor, src: torch.Tensor, specs: list[SourceSpec], vocab: int) -> None:
    """A token file's ids outside the tokenizer's vocabulary, refused naming the source that gave them."""
    bad = ((ids < 0) | (ids >= vocab)).any(dim=1).nonzero()
    if bad.numel():
        r = int(bad[0])
        row = ids[r]
        v = int(row[(row < 0) | (row >= vocab)][0])
        raise MoepressError(f"--calib {specs[int(src[r])].spec}: token id {v} is outside the tokenizer's vocabulary "
                            f"(0..{vocab - 1})")


def _as_asked(side: dict, specs: list[SourceSpec], model_dir: Path) -> dict:
    """A cached set's description with this request's source paths and model (the cache key leaves
    them out: the same bytes through another path or model with the same tokenizer are one set)."""
    olds = side.get("sources") if isinstance(side.get("sources"), list) else []
    sources = [{**(o if isinstance(o, dict) else {}), "spec": s.spec, "location": s.location}
               for o, s in zip(olds, specs, strict=False)]
    tok = side.get("tokenizer") if isinstance(side.get("tokenizer"), dict) else {}
    # the cache file's own fields (format, version, file) are not the set's: a fresh set has none
    own = {k: v for k, v in side.items() if k not in ("format", "version", "file")}
    return {**own, "sources": sources, "tokenizer": {**tok, "model": str(model_dir)}}


def calibration_batches(model_dir: str | Path, sources: tuple[str, ...] = (), num_samples: int = 64,
                        seq_len: int = 256, seed: int = 0, batch_size: int = 8,
                        trust_remote_code: bool = False, *, cache: bool = True,
                        progress: Progress = QUIET) -> list[torch.Tensor]:
    """Calibration token batches [B, seq_len] for a model: the stable entry point every stage uses.

    ``sources`` are ``--calib`` values (default: the bundled calibration text); ``num_samples``
    samples of ``seq_len`` tokens drawn with ``seed``; reused from the on-disk cache when the
    same tokenizer, sources and parameters made them before.
    """
    return calibration_set(model_dir, sources, num_samples, seq_len, seed, trust_remote_code,
                           cache=cache, progress=progress).batches(batch_size)
