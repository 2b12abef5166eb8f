"""Calibration sources: what ``--calib SOURCE`` names, parsed, validated, read and hashed.

Syntax of one ``--calib`` value (repeatable; several sources are mixed by weight)::

    LOCATION[@WEIGHT][,KEY=VALUE...]

LOCATION is a file or folder, ``bundled`` (the bundled calibration text), ``hf:NAME``
(a Hugging Face Hub dataset; a bare ``owner/name`` that is not a local path means the
same), or a token file made by ``moepress calib prepare``. Keys: ``weight`` (same as
``@WEIGHT``), ``field`` (JSONL/Parquet/dataset column; default ``text``, else
``messages``), ``mode`` (``pack``: documents concatenated with EOS and cut into
windows, the default, one document giving at most 1/16 of the tokens (one sample's worth below 16
samples) while the source has enough others; ``truncate``: one document per sample, its first seq-len tokens,
shorter documents skipped), ``split`` (dataset split), ``type`` (force a type), and for
the Hub ``config`` and ``revision``.

Types by extension: ``.txt .md .rst .text`` text (a file is one document, or with mode=pack
pieces of about 1 MiB cut at line ends where it is larger; a folder is every such file under
it); ``.jsonl .json`` JSON lines, one document per record (a
string field, or chat ``messages`` rendered with the tokenizer's chat template);
``.parquet``; a folder written by ``datasets``' ``save_to_disk``; ``.safetensors .pt``
with a ``.json`` sidecar: a prepared token file.

A source is read lazily: :class:`Documents` knows how many documents there are and
returns one by index, so sampling touches (and tokenizes) only what it uses.

- :mod:`.spec`: parsing and validating ``--calib`` values (:func:`parse_source`);
- :mod:`.hashing`: content hashes for the calibration cache's key;
- :mod:`.documents`: local documents (text, JSON lines, Parquet, saved datasets);
- :mod:`.hub`: Hugging Face Hub datasets, streamed.
"""

from moepress.calib.sources.documents import (
    PIECE_BYTES,
    ColumnDocuments,
    Documents,
    JsonlDocuments,
    TextDocuments,
    dataset_documents,
    open_documents,
    parquet_documents,
    piece_start,
    read_utf8,
)
from moepress.calib.sources.hashing import _file_sha, content_hash, sidecar_path, text_files
from moepress.calib.sources.hub import hub_documents
from moepress.calib.sources.spec import (
    AUTO_FIELDS,
    BUNDLED_CALIB,
    JSONL_SUFFIXES,
    KEYS,
    MODES,
    PARQUET_SUFFIXES,
    TEXT_SUFFIXES,
    TOKEN_SUFFIXES,
    TYPES,
    SourceSpec,
    local_paths,
    parse_source,
    parse_sources,
    refuse_output_over,
)

__all__ = ["AUTO_FIELDS", "BUNDLED_CALIB", "JSONL_SUFFIXES", "KEYS", "MODES", "PARQUET_SUFFIXES", "PIECE_BYTES",
           "TEXT_SUFFIXES", "TOKEN_SUFFIXES", "TYPES", "ColumnDocuments", "Documents", "JsonlDocuments", "SourceSpec",
           "TextDocuments", "_file_sha", "content_hash", "dataset_documents", "hub_documents", "local_paths",
           "open_documents", "parquet_documents", "parse_source", "parse_sources", "piece_start", "read_utf8",
           "refuse_output_over", "sidecar_path", "text_files"]
