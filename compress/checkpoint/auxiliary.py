"""The files of a checkpoint besides its weights and config.json that every output carries over
(tokenizer, chat template, generation config, remote code), and that a stage's inputs therefore include."""

from __future__ import annotations

from pathlib import Path

from moepress.errors import MoepressError

# Files that travel with a checkpoint whatever moepress does to its weights
# (tokenizer, chat template, generation defaults, remote code such as Kimi K2's).
AUX_FILE_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*",
    "generation_config.json", "vocab*", "merges.txt", "*.tiktoken", "tiktoken.model", "spiece.model",
    "tokenization_*.py",
    "configuration_*.py", "modeling_*.py", "preprocessor_config.json",
)


def aux_files(src: Path) -> list[Path]:
    """Tokenizer, chat template, generation config and remote-code files of a checkpoint. One that is a link
    resolving outside it is refused (:func:`check_inside`): every output would carry the file it points to, a
    private one (``/proc/self/environ``: the environment, tokens included) into what publish uploads."""
    out: set[Path] = set()
    for pat in AUX_FILE_PATTERNS:
        for p in src.glob(pat):
            if p.is_symlink():
                check_inside(src, p, f"{p}: resolves to")
            if p.is_file():
                out.add(p)
    return sorted(out)


def check_inside(root: Path, file: Path, what: str) -> None:
    """Refuse a file of checkpoint ``root`` that resolves (symlinks followed) outside it, so that a checkpoint
    makes moepress read, and copy into its outputs, only its own files. The exception is the Hugging Face hub
    cache (huggingface_hub file_download.py: ``snapshots/<revision>/<file>`` is a symlink to
    ``../../blobs/<hash>``): a snapshot's files may resolve into its repository's blobs."""
    try:  # a symlink loop: RuntimeError from resolve (Python <= 3.12), ELOOP from stat (3.13 resolves it)
        root, target = root.resolve(), file.resolve()
        if file.is_symlink():
            file.stat()
    except (OSError, RuntimeError) as e:
        raise MoepressError(f"{file}: cannot be resolved ({e}); expected a file or a link to one") from None
    if target.is_relative_to(root):
        return
    if root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs":
        return
    raise MoepressError(f"{what} {target}, outside the model directory {root}")
