"""Sampling one source's documents into token windows (``mode=pack`` / ``mode=truncate``, see
:mod:`moepress.calib.data`), reading and tokenizing only what the samples take: documents in growing
chunks, a long document by parts.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from moepress.calib.sources import SourceSpec
from moepress.errors import MoepressError

# tokens past the ``need`` a prefix must give before its first ``need`` are taken as the whole text's: a cut
# moves the tokens next to it only
CUT_MARGIN = 64


def _render(tok, doc, where: str) -> tuple[str, bool]:
    """(text, is_chat): chat messages through the tokenizer's chat template when it has one."""
    if isinstance(doc, str):
        return doc, False
    if getattr(tok, "chat_template", None):
        try:
            return tok.apply_chat_template(doc, tokenize=False), True
        except Exception as e:  # jinja errors for roles a template rejects, etc.
            raise MoepressError(f"{where}: the chat template rejects these messages ({e})") from None
    return "".join(f"{m['role']}: {m['content']}\n" for m in doc), False


def _encode(tok, texts: list[str], special: list[bool]) -> list[list[int]]:
    out: list[list[int] | None] = [None] * len(texts)
    for flag in (False, True):
        idx = [i for i, s in enumerate(special) if s == flag]
        if idx:
            enc = tok([texts[i] for i in idx], add_special_tokens=flag, verbose=False)["input_ids"]
            for i, ids in zip(idx, enc, strict=True):
                out[i] = list(ids)
    return out  # type: ignore[return-value]


def _random_order(n: int, g: torch.Generator):
    """0..n-1 in a seeded random order; lazily for huge n (sampling usually stops after a few thousand)."""
    if n <= 10_000_000:
        yield from torch.randperm(n, generator=g).tolist()
        return
    seen: set[int] = set()
    while len(seen) < n:
        for i in torch.randint(n, (4096,), generator=g).tolist():
            if i not in seen:
                seen.add(i)
                yield i


def _ordered_docs(docs, g: torch.Generator):
    """(where, document) in a seeded random order."""
    if hasattr(docs, "__len__"):
        for i in _random_order(len(docs), g):
            yield docs.where(i), docs[i]
    else:  # a streamed (Hub) dataset, already shuffled by seed
        for i, d in enumerate(docs):
            yield f"document {i + 1}", d


# a chunk of documents is tokenized once it holds this many characters, whatever its count: a few long documents
# (a large text file's 1 MiB pieces) hold far more tokens than a calibration set takes
CHUNK_CHARS = 1 << 18


def _chars(doc) -> int:
    return len(doc) if isinstance(doc, str) else sum(len(str(m.get("content", ""))) for m in doc)


def chunks(it, sizes=(4, 16, 64, 256)):
    """(where, document) pairs in growing chunks, so a source that needs few documents tokenizes few (which
    documents a sample takes does not depend on the chunks: sampling stops at the document that completes it)."""
    k, n = 0, 0
    buf = []
    for x in it:
        buf.append(x)
        n += _chars(x[1])
        if len(buf) >= sizes[min(k, len(sizes) - 1)] or n >= CHUNK_CHARS:
            yield buf
            buf, k, n = [], k + 1, 0
    if buf:
        yield buf


# a document longer than this many characters is tokenized by parts of about this size (mode=pack: in a seeded
# random order, until the samples are complete; mode=truncate: its first part), never whole for a few thousand
# tokens: a tokenizer holds many times the size of the text it encodes at once
LONG_CHARS = 1 << 20


def _cut(text: str, a: int, size: int) -> int:
    """The end of the part of ``text`` starting at ``a``: after the last newline (else space) in its second half,
    else at ``a + size``; the text's end when less remains."""
    b = a + size
    if b >= len(text):
        return len(text)
    for sep in ("\n", " "):
        k = text.rfind(sep, a + size // 2, b)
        if k >= 0:
            return k + 1
    return b


def _parts(text: str, seed: int, index: int) -> Iterator[str]:
    """A document's text as it is tokenized: whole, or (over LONG_CHARS characters) by parts of about LONG_CHARS,
    in an order drawn from ``seed`` and the document's ``index`` in the draw."""
    if len(text) <= LONG_CHARS:
        yield text
        return
    bounds, a = [], 0
    while a < len(text):
        b = _cut(text, a, LONG_CHARS)
        bounds.append((a, b))
        a = b
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    for k in torch.randperm(len(bounds), generator=g).tolist():
        a, b = bounds[k]
        yield text[a:b]


# mode=pack: one document gives at most 1/PACK_DOCS of a source's tokens, or one sample's worth where fewer than
# PACK_DOCS samples are drawn (its first ones; a long document's, from its first part in the seeded order of its
# parts) while the source holds enough other text, so a corpus of long documents (books, long chats) is not
# calibrated on the one or two drawn first. A source the cap leaves short is
# packed again with the cap doubled until it fills; a source of one document gives random windows of it whole.
PACK_DOCS = 16
# a capped document is tokenized from a prefix of this many characters per token of the cap (cut at a line end),
# whole where the prefix gives fewer than the cap and CUT_MARGIN
PREFIX_CHARS = 16


class _Doc:
    """A document drawn for pack: its number in the draw, the tokens of its parts read so far and the parts
    still to read; ``head``: the first tokens of its first part, from a prefix, until that part is read whole."""

    def __init__(self, tok, number: int, parts: Iterator[str], first: str, ids: list[int] | None,
                 head: list[int] | None = None):
        """``ids``: the first part's tokens where they are known, else ``head``, its first tokens."""
        self.tok, self.number, self.parts = tok, number, parts
        self.pending, self.head = (first, head) if ids is None else (None, None)
        self.ids: list[int] = [] if ids is None else ids
        self.whole = False

    def first(self, k: int, parts: bool = False) -> list[int]:
        """Its first ``k`` tokens, or (``parts``) its parts read whole until they hold ``k``; ``whole`` once every
        part is read."""
        if self.pending is not None:
            if k <= len(self.head) and not parts:
                return self.head[:k]
            self.ids, self.pending, self.head = _encode(self.tok, [self.pending], [False])[0], None, None
        while len(self.ids) < k and not self.whole:
            part = next(self.parts, None)
            if part is None:
                self.whole = True
            else:
                self.ids.extend(_encode(self.tok, [part], [False])[0])
        return self.ids


def _drawn(tok, chunk: list, cap: int | None, seed: int, used: int) -> list[_Doc | None]:
    """A chunk's documents for pack (None: an empty one), each tokenized as far as its first ``cap`` tokens need:
    a prefix of the first part, the chunk's prefixes in one batch (no cap: the first parts whole)."""
    parts = [_parts(_render(tok, d, w)[0], seed, used + k + 1) for k, (w, d) in enumerate(chunk)]
    firsts = [next(p) for p in parts]
    prefixes = [t[:_cut(t, 0, cap * PREFIX_CHARS)] for t in firsts] if cap else firsts
    enc = _encode(tok, prefixes, [False] * len(prefixes))
    out: list[_Doc | None] = []
    for k, (first, prefix, ids) in enumerate(zip(firsts, prefixes, enc, strict=True)):
        if not first:  # an empty document (a null or "" field) is no text: no EOS for it either
            out.append(None)
        elif len(prefix) == len(first):  # the whole first part
            out.append(_Doc(tok, used + k + 1, parts[k], first, ids))
        elif len(ids) < cap + CUT_MARGIN:  # too short a prefix: the whole part, now
            out.append(_Doc(tok, used + k + 1, parts[k], first, _encode(tok, [first], [False])[0]))
        else:  # the prefix's last tokens may differ from the whole part's
            out.append(_Doc(tok, used + k + 1, parts[k], first, None, ids[:len(ids) - CUT_MARGIN]))
    return out


def _pack_stream(tok, docs, need: int, cap: int | None, g_docs: torch.Generator) -> tuple[list[int], int]:
    """(token stream of at least ``need`` tokens where the source holds them, documents used): each document's
    first ``cap`` tokens and EOS; a source the cap leaves short is packed again (``_repack``). No cap (one sample
    asked: one document fills it): each document's parts whole, until the stream holds ``need``."""
    eos = tok.eos_token_id
    used, stream, taken = 0, [], []
    for chunk in chunks(_ordered_docs(docs, g_docs)):
        for doc in _drawn(tok, chunk, cap, g_docs.initial_seed(), used):
            used += 1
            if doc is None:
                continue
            taken.append(doc)
            stream.extend(doc.first(cap)[:cap] if cap else doc.first(need - len(stream), parts=True))
            if len(stream) >= need:
                return stream, used
            if eos is not None:
                stream.append(eos)
    return _repack(taken, need, cap, eos, used) if cap else (stream, used)


def _repack(taken: list[_Doc], need: int, cap: int, eos: int | None, read: int) -> tuple[list[int], int]:
    """The documents read, packed again with the cap doubled until they fill ``need`` (or hold no more). One
    document: its parts whole until they fill ``need``, so that the samples are random windows of all of it.
    Returns (stream, documents used)."""
    if len(taken) == 1:
        stream = list(taken[0].first(need, parts=True))
        if len(stream) >= need:
            return stream, taken[0].number
        return stream + ([eos] if eos is not None else []), read
    while True:
        stream: list[int] = []
        for doc in taken:
            stream.extend(doc.first(cap)[:cap])
            if len(stream) >= need:
                return stream, doc.number
            if eos is not None:
                stream.append(eos)
        if cap >= need or all(d.whole for d in taken):
            return stream, read
        cap *= 2


def pack(tok, src: SourceSpec, docs, n: int, seq_len: int, g_docs: torch.Generator,
         g_pick: torch.Generator) -> tuple[torch.Tensor, int, int]:
    """mode=pack: (samples, documents used, tokens read)."""
    need = n * seq_len
    cap = max(seq_len, -(-need // PACK_DOCS))
    stream, used = _pack_stream(tok, docs, need, cap if cap < need else None, g_docs)
    total = len(stream)
    nwin = total // seq_len
    if total == 0:
        raise MoepressError(f"{src.location}: all {used} documents are empty (null or \"\" text); "
                            f"expected text to calibrate on (name its field with --calib FILE,field=NAME)")
    if nwin == 0:
        raise MoepressError(f"{src.location}: {total} tokens, fewer than one sample of --seq-len {seq_len} needs")
    if nwin < n:
        raise MoepressError(f"{src.location}: {total} tokens give {nwin} samples of --seq-len {seq_len}, "
                            f"fewer than the {n} asked (lower --num-samples or --seq-len, or add data)")
    rows = torch.tensor(stream[: nwin * seq_len], dtype=torch.long).view(nwin, seq_len)
    return rows[torch.randperm(nwin, generator=g_pick)[:n]], used, total


def truncate(tok, src: SourceSpec, docs, n: int, seq_len: int, g_docs: torch.Generator,
             g_pick: torch.Generator) -> tuple[torch.Tensor, int, int]:
    """mode=truncate: (samples, documents used, tokens read); ``g_pick`` is not used."""
    used = 0
    total = 0
    rows_l: list[list[int]] = []
    longest = 0
    for chunk in chunks(_ordered_docs(docs, g_docs)):
        rendered = [_render(tok, d, w) for w, d in chunk]
        # a long document: the tokens of its first part where they hold a sample (its first seq_len tokens)
        firsts = [t[:_cut(t, 0, LONG_CHARS)] for t, _ in rendered]
        enc = _encode(tok, firsts, [not chat for _, chat in rendered])
        for k, (t, chat) in enumerate(rendered):
            if len(firsts[k]) < len(t) and len(enc[k]) < seq_len + CUT_MARGIN:
                enc[k] = _encode(tok, [t], [not chat])[0]
        for ids in enc:
            used += 1
            longest = max(longest, len(ids))
            total += len(ids)
            if len(ids) >= seq_len:
                rows_l.append(ids[:seq_len])
                if len(rows_l) == n:
                    break
        if len(rows_l) == n:
            break
    if not rows_l:
        raise MoepressError(f"{src.location}: no document has the {seq_len} tokens one sample needs "
                            f"(longest: {longest} tokens; mode=truncate)")
    if len(rows_l) < n:
        raise MoepressError(f"{src.location}: only {len(rows_l)} document(s) have {seq_len} tokens or more, "
                            f"fewer than the {n} samples asked (mode=truncate; try mode=pack)")
    return torch.tensor(rows_l, dtype=torch.long), used, total
