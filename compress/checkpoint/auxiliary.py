"""The files of a checkpoint besides its weights and config.json that every output carries over
(tokenizer, chat template, generation config, remote code), and that a stage's inputs therefore include."""

from __future__ import annotations

from pathlib import Path

# Files that travel with a checkpoint whatever moepress does to its weights
# (tokenizer, chat template, generation defaults, remote code such as Kimi K2's).
AUX_FILE_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*",
    "generation_config.json", "vocab*", "merges.txt", "*.tiktoken", "tiktoken.model", "spiece.model",
    "tokenization_*.py",
    "configuration_*.py", "modeling_*.py", "preprocessor_config.json",
)


def aux_files(src: Path) -> list[Path]:
    """Tokenizer, chat template, generation config and remote-code files of a checkpoint."""
    out: set[Path] = set()
    for pat in AUX_FILE_PATTERNS:
        out.update(p for p in src.glob(pat) if p.is_file())
    return sorted(out)
