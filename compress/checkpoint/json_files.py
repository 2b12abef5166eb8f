"""The checkpoint's JSON files (config.json, the shard index) read as strictly as their strictest consumer:
one line naming the file when it is unreadable, not JSON, not an object, or holds a number JSON has not."""

from __future__ import annotations

import json
from pathlib import Path

from moepress.compress.checkpoint.safetensors_io import refuse_special
from moepress.errors import MoepressError


class _NotJSONNumber(ValueError):
    pass


def _no_constant(name: str):
    """Python reads NaN / Infinity in JSON; JSON has no such numbers (RFC 8259), strict readers (TensorRT-LLM's
    C++ one, serde) refuse the file, and a config value of NaN routes or scales nothing."""
    raise _NotJSONNumber(name)


def read_json_file(path: Path) -> dict:
    """A JSON file as Python values; one line naming the file where it cannot be read as JSON."""
    try:
        refuse_special(path, "a JSON file")
        return json.loads(path.read_text(), parse_constant=_no_constant)
    except _NotJSONNumber as e:
        raise MoepressError(f"{path}: not valid JSON ({e} is not a JSON number; expected a finite number)") from None
    except FileNotFoundError:
        raise MoepressError(f"{path}: file not found") from None
    except PermissionError as e:
        raise MoepressError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise MoepressError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise MoepressError(f"{path}: not valid JSON (not UTF-8 text: invalid byte at offset {e.start})") from None
    except RecursionError:
        raise MoepressError(f"{path}: expected a config (JSON nested too deeply to read)") from None


def read_config_file(path: str | Path) -> dict:
    """A config.json-like file as a dict; one line naming the file when it is unreadable or not an object."""
    cfg = read_json_file(Path(path))
    if not isinstance(cfg, dict):
        raise MoepressError(f"{path}: expected a JSON object")
    if not isinstance(cfg.get("quantization_config") or {}, dict):  # every reader of it asks .get of it
        raise MoepressError(f"{path}: quantization_config is {type(cfg['quantization_config']).__name__}; expected a "
                            "JSON object")
    return cfg
