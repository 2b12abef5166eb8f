"""The tokenizer of a checkpoint: loading it (remote code only when allowed) and its fingerprint,
which keys the calibration cache: the files that decide the token ids, the libraries' versions and,
where no tokenizer class is named, the model type transformers picks the class by."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from moepress.calib.sources.hashing import _file_sha
from moepress.compress.arch import transformers_config
from moepress.errors import MoepressError

# Files that decide how a checkpoint tokenizes (their bytes make the tokenizer's fingerprint).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "tiktoken.model", "vocab.json", "vocab.txt", "merges.txt", "spiece.model")
TOKENIZER_GLOBS = ("*.tiktoken", "tokenization_*.py", "chat_template*")


def _tokenizer_config(model_dir: Path) -> dict:
    p = model_dir / "tokenizer_config.json"
    try:
        cfg = json.loads(p.read_text()) if p.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise MoepressError(f"{p}: not valid JSON, or nested too deeply to read") from None
    if not isinstance(cfg, dict):
        raise MoepressError(f"{p}: a JSON {type(cfg).__name__}; expected a JSON object (the tokenizer's settings)")
    return cfg


def needs_remote_code(model_dir: str | Path) -> bool:
    """True when the tokenizer is a class shipped as Python code in the checkpoint (Kimi K2's): an ``auto_map``
    whose ``tokenizer_class`` transformers does not have. Where it has the class, it loads its own without
    trust_remote_code (and with it would run the checkpoint's code instead), so none is asked for."""
    cfg = _tokenizer_config(Path(model_dir))
    return _auto_map(cfg) and not native_tokenizer(cfg.get("tokenizer_class"))


def _auto_map(cfg: dict) -> bool:
    """Whether tokenizer_config.json (``cfg``) names a tokenizer class of the checkpoint's own code (``auto_map``)."""
    auto = cfg.get("auto_map") or {}
    return bool(auto.get("AutoTokenizer") if isinstance(auto, dict) else auto)


def native_tokenizer(name) -> bool:
    """Whether transformers provides the tokenizer class ``name`` (tokenization_auto's lookup by name)."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    return isinstance(name, str) and any(tokenizer_class_from_name(n) is not None for n in (name, name + "Fast"))


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    needs = needs_remote_code(model_dir)
    if needs and not trust_remote_code:
        raise MoepressError(f"{model_dir}: the tokenizer needs its own Python code; "
                            f"pass --trust-remote-code to allow it")
    tokenizer_files(model_dir)
    # not the checkpoint's tokenizer code beside a class transformers has (tokenizer_config.json's auto_map and
    # tokenizer_class): with trust_remote_code, transformers runs that code in place of its own class
    shadowed = not needs and _auto_map(_tokenizer_config(Path(model_dir)))
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code and not shadowed,
                                             **_family_config(Path(model_dir)))
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise MoepressError(f"{model_dir}: the tokenizer needs its own Python code; "
                                f"pass --trust-remote-code to allow it") from None
        raise MoepressError(f"{model_dir}: cannot load tokenizer ({(str(e).splitlines() or [''])[0]})") from None
    except OSError as e:
        raise MoepressError(f"{model_dir}: no tokenizer found ({str(e).splitlines()[0]})") from None
    except (AttributeError, KeyError, TypeError) as e:  # transformers' own config handling of an odd config.json
        raise MoepressError(f"{model_dir}: cannot load tokenizer ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0]})") from None


def _family_config(model_dir: Path) -> dict:
    """``config=`` for AutoTokenizer where transformers does not know config.json's model_type but
    moepress's families do (Kimi K2's ``kimi_k2``): transformers would read config.json as a bare
    PreTrainedConfig, and its rope validation of Kimi's yarn ``rope_scaling`` fails on that
    (transformers 5.24 ``tokenization_auto.py``)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    hf = transformers_config(config, str(model_dir / "config.json"))
    return {"config": hf} if hf is not None else {}


def tokenizer_files(model_dir: str | Path) -> set[Path]:
    """The tokenizer's files in ``model_dir``; one line if it has none (transformers would build an empty
    tokenizer from config.json alone, or fail with a multi-line message)."""
    d = Path(model_dir)
    files = {p for p in (d / n for n in TOKENIZER_FILES) if p.is_file()}
    for g in TOKENIZER_GLOBS:
        files.update(p for p in d.glob(g) if p.is_file())
    # what holds a vocabulary (a chat template or added tokens alone make transformers build an empty one)
    if not any(p.name not in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
               and not p.name.startswith("chat_template") for p in files):
        raise MoepressError(f"{d}: no tokenizer found (expected tokenizer.json, tokenizer.model, "
                            f"tiktoken.model or vocab files next to config.json)")
    return files


def tokenizer_fingerprint(model_dir: str | Path, memo: dict | None = None) -> dict:
    """sha256 over the tokenizer's files (names and bytes); raises if the model has none."""
    d = Path(model_dir)
    files = tokenizer_files(d)
    per = {p.name: _file_sha(p, memo) for p in sorted(files)}
    h = hashlib.sha256("".join(f"{k}\0{v}\0" for k, v in {**per, **_tokenizer_context(d)}.items()).encode())
    return {"sha256": h.hexdigest(), "files": per}


def _tokenizer_context(d: Path) -> dict[str, str]:
    """What decides the token ids besides the tokenizer's files: the libraries' versions, and, where
    tokenizer_config.json names no ``tokenizer_class``, config.json's ``model_type`` (transformers
    then picks the class by it, e.g. Qwen2Tokenizer's normalizer for qwen3_moe)."""
    import tokenizers
    import transformers

    out = {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
    if not _tokenizer_config(d).get("tokenizer_class"):
        try:
            out["model_type"] = str(json.loads((d / "config.json").read_text()).get("model_type"))
        except (OSError, ValueError, AttributeError):
            out["model_type"] = ""
    return out
