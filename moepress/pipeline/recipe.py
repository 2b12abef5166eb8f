"""Recipes: one YAML file naming the model, calibration, prune, quantize, export, check and build.

A recipe is plain data; :func:`load_recipe` validates it (unknown keys and wrong types are
one-line errors naming the file and the key) and fills defaults, so ``moepress recipe show``
prints exactly what ``moepress run`` will do. Each stage's section becomes that stage's own
frozen config (``PruneConfig``, ``QuantConfig``, ``ExportConfig``, ``CheckConfig``) in the runner.
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager
from pathlib import Path

import yaml

from moepress.errors import MoepressError

DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "default.yaml"

# section -> {key: (type(s), default)}; None as a default means "not set"
SCHEMA: dict[str, dict[str, tuple]] = {
    "calib": {"sources": (list, []), "num_samples": (int, 64), "seq_len": (int, 256), "seed": (int, 0),
              "trust_remote_code": (bool, False)},
    "prune": {"ratio": ((float, int), None), "keep": (int, None), "method": (str, None), "ep_size": (int, 1),
              "protect": (str, ""), "sequential": (bool, False), "search_tokens": (int, 16384),
              "merge": (bool, None), "race": (str, "")},
    "quantize": {"format": (str, None), "group_size": (int, 128), "kv_cache": (str, None), "rules": (dict, {}),
                 "sequential": (bool, None), "gptq_act_order": (bool, None), "awq_clip": (bool, True),
                 "awq_gptq": (bool, True), "awq_fold": (bool, False)},
    "export": {"formats": (list, []), "tp": (int, 1), "ep": (int, 1), "opset": (int, 21), "options": (dict, {})},
    "check": None,  # validated by CheckConfig.from_dict
    "build": {"targets": (list, []), "dry_run": (bool, True), "gpus": (int, None), "max_seq_len": (int, None),
              "max_batch": (int, 8), "trust_remote_code": (bool, False)},
}
# list keys and the type of their elements
ELEMENTS = {("calib", "sources"): str, ("export", "formats"): str, ("build", "targets"): str}
# keys that must be positive when set
POSITIVE = {("build", "gpus"), ("build", "max_seq_len"), ("build", "max_batch"), ("prune", "search_tokens")}
TOP = {"model", "output", "device", *SCHEMA}
STAGES = ("prune", "quantize", "export", "check", "build")
# a stage's CLI flag -> its recipe key, where the key is not the flag's name (--num-samples -> num_samples)
KEYS = {"calib": {"--calib": "sources"}, "quantize": {"--rule": "rules"},
        "export": {"--format": "formats", "--tp/--ep": "tp/ep", "--option": "options"}}


def key_where(src: str, *keys) -> str:
    return f"{src}: " + ".".join(str(k) for k in keys)


def normalise(raw: dict, src: str = "recipe") -> dict:
    """Validate ``raw`` and return the effective recipe (defaults filled; skipped stages None)."""
    out = _top_level(raw, src)
    for section in SCHEMA:
        out[section] = _section(raw, src, section)
    if out["prune"] is not None and (out["prune"]["ratio"] is None) == (out["prune"]["keep"] is None):
        raise MoepressError(f"{key_where(src, 'prune')}: give exactly one of ratio and keep")
    if out["quantize"] is not None and not out["quantize"]["format"] and not out["quantize"]["rules"]:
        raise MoepressError(f"{key_where(src, 'quantize', 'format')}: required (or rules)")
    for section, key in (("export", "formats"), ("build", "targets")):
        _skip_if_empty(src, out, raw, section, key)
    _refuse_unused_opset(src, out)
    if out["quantize"] is not None:
        _check_quantize(src, out, {k for k, v in out["quantize"].items() if v != SCHEMA["quantize"][k][1]})
    return out


def _top_level(raw: dict, src: str) -> dict:
    """The top-level keys checked: model, output and device read; the sections' names known."""
    if not isinstance(raw, dict):
        raise MoepressError(f"{src}: expected a YAML mapping at the top level")
    # x- keys hold what other keys refer to (YAML anchors for ``<<: *anchor``), as in Compose files; never read
    bad = sorted({k for k in raw if not (isinstance(k, str) and k.startswith("x-"))} - TOP, key=str)
    if bad:
        raise MoepressError(f"{src}: unknown key '{bad[0]}' (expected {', '.join(sorted(TOP))})")
    if not isinstance(raw.get("model"), str) or not raw["model"]:
        raise MoepressError(f"{src}: 'model' must name a checkpoint directory or a bundled model")
    if raw.get("output") is not None and (not isinstance(raw["output"], str) or not raw["output"].strip()):
        raise MoepressError(f"{key_where(src, 'output')}: expected a directory path, got {raw['output']!r}")
    # a path as a shell would take it (``~/x``, not a directory named ``~`` under the current one)
    out: dict = {"model": _home(raw["model"]), "output": _home(raw.get("output"))}
    if raw.get("device") is not None:  # where the stages compute (moepress/device.py); outputs do not depend on it
        from moepress.device import is_spec

        if not isinstance(raw["device"], str) or not is_spec(raw["device"].strip().lower()):
            raise MoepressError(f"{key_where(src, 'device')}: expected auto, cpu, cuda or cuda:N, "
                                f"got {raw['device']!r}")
        out["device"] = raw["device"]
    if "calib" in raw and raw["calib"] is None:
        raise MoepressError(f"{key_where(src, 'calib')}: expected a mapping (calibration is no stage to skip; leave "
                            f"the key out, or {{}}, for its defaults)")
    return out


def _section(raw: dict, src: str, section: str) -> dict | None:
    """One section as its schema says (None: a skipped stage); ``check`` as CheckConfig reads it."""
    val = raw.get(section, {} if section in ("calib", "check") else None)
    if val is None:
        return None
    if not isinstance(val, dict):
        skip = "" if section == "calib" else " (or null to skip the stage)"  # calib: null is refused before
        raise MoepressError(f"{key_where(src, section)}: expected a mapping{skip}")
    spelt = [str(k).replace("-", "_") for k in val]
    twice = next((k for k in spelt if spelt.count(k) > 1), None)
    if twice is not None:  # ep_size and ep-size: the later one won, silently
        raise MoepressError(f"{key_where(src, section, twice)}: given twice (with - and with _)")
    if SCHEMA[section] is None:
        return _check_section(val, src, section)
    norm = {str(k).replace("-", "_"): v for k, v in val.items()}
    schema = SCHEMA[section]
    unknown = sorted(set(norm) - set(schema))
    if unknown:
        raise MoepressError(f"{key_where(src, section, unknown[0])}: unknown key "
                            f"(expected {', '.join(sorted(schema))})")
    sec = {}
    for key, (typ, default) in schema.items():
        v = norm.get(key, copy.deepcopy(default))
        tname = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        if v is None and isinstance(default, (list, dict)):  # ``rules:`` with its entries commented out
            v = copy.deepcopy(default)
        if v is None and default is not None:  # dry_run: null ran a real build
            raise MoepressError(f"{key_where(src, section, key)}: expected {tname}, got null (leave the key "
                                f"out for its default, {json.dumps(default)})")
        if v is not None and (not isinstance(v, typ) or (isinstance(v, bool) and typ is not bool)):
            raise MoepressError(f"{key_where(src, section, key)}: expected {tname}, got {v!r}{_yaml_hint(v, typ)}")
        _check_value(src, section, key, v)
        sec[key] = v
    return sec


def _check_section(val: dict, src: str, section: str) -> dict:
    """The check section: CheckConfig's keys (no ``kind``: each artifact is checked as what it is)."""
    from moepress.checks.config import CheckConfig

    if "kind" in val:
        raise MoepressError(f"{key_where(src, section, 'kind')}: not a recipe key (each artifact is checked "
                            "with the kind its format needs)")
    val = {k: _home(v) if str(k) == "data" else v for k, v in val.items()}  # as model, output, calib
    try:
        CheckConfig.from_dict(val, where=key_where(src, section))
    except MoepressError as e:  # a gate written off / no: YAML 1.1 read it as a boolean
        said = next((v for v in val.values() if isinstance(v, bool) and f" {v}:" in str(e)), None)
        raise MoepressError(str(e) + ("" if said is None else _yaml_hint(said, str))) from None
    return copy.deepcopy(val)


def _refuse_unused_opset(src: str, out: dict) -> None:
    """``export.opset`` set off its default without onnx in ``export.formats``: only the ONNX export reads it (as
    ``tp`` / ``ep`` given to an export that writes no ranks are refused by the exporter). Its default is taken, as
    `recipe show` writes it."""
    if out["export"] is not None and out["export"]["opset"] != SCHEMA["export"]["opset"][1] \
            and "onnx" not in (out["export"]["formats"] or []):
        raise MoepressError(f"{key_where(src, 'export', 'opset')} {out['export']['opset']}: only the onnx export reads "
                            "it; expected onnx in export.formats, or no opset")


def _skip_if_empty(src: str, out: dict, raw: dict, section: str, key: str) -> None:
    """A section whose list ``key`` is empty or left out runs nothing: it becomes None. Refused where the section
    sets other keys (``export: {tp: 2}`` exported nothing, without a word: its formats have no default)."""
    if out[section] is None or out[section][key]:
        return
    given = sorted(str(k).replace("-", "_") for k in raw[section] if str(k).replace("-", "_") != key)
    if given:
        raise MoepressError(f"{key_where(src, section, key)}: required: the section sets {', '.join(given)} but "
                            f"names no {key} (an empty {section} section, or null, skips the stage)")
    out[section] = None


def _check_quantize(src: str, recipe: dict, given: set[str]) -> None:
    """The quantize section as the stage will build it, refused now and by its recipe key (the stage's
    own message names the CLI flag: ``--format int3`` -> ``quantize.format int3``); its own keys set off their
    defaults (``given``: what ``recipe show`` prints runs as written) that no format of it uses, as the CLI refuses
    their flags (the calib section is shared with prune: not judged here)."""
    from moepress.calib.config import CalibConfig
    from moepress.compress.quantize.config import QuantConfig

    with recipe_keys(src, "quantize"):
        cfg = QuantConfig.from_recipe(recipe["quantize"], CalibConfig.from_recipe(recipe["calib"]))
        cfg.refuse_unused(given)
        cfg.refuse_unused_group(recipe["quantize"].get("group_size") if "group_size" in given else None, "--group-size")


@contextmanager
def recipe_keys(src: str, section: str):
    """A stage's own refusal, whose line names its CLI flag (``--format int3: ...``), raised again naming
    the recipe's key (``recipe.yaml: quantize.format int3: ...``); a line naming a file gets the section."""
    try:
        yield
    except MoepressError as e:
        msg = str(e)
        flag, _, rest = msg.partition(" ") if msg.startswith("--") else ("", "", msg)
        name = flag.rstrip(":")  # a boolean flag named in both forms (--awq-gptq/--no-awq-gptq): its first
        key = KEYS.get(section, {}).get(name, name.split("/")[0].removeprefix("--").replace("-", "_"))
        sep = ":" if flag.endswith(":") or not key else ""
        raise MoepressError(f"{key_where(src, section, key) if key else key_where(src, section)}{sep} {rest}") from None


def export_config(section: dict, fmt: str):
    """The ExportConfig of the recipe's ``export`` section for ``fmt``."""
    from moepress.exporters import ExportConfig

    return ExportConfig(format=fmt, tp=section["tp"], ep=section["ep"], opset=section["opset"],
                        options=tuple(sorted((str(k), str(v)) for k, v in section["options"].items())))


def _check_value(src: str, section: str, key: str, v) -> None:
    """A list key's elements and a positive number (build sizes, prune.search_tokens), refused in one
    line naming the key."""
    elem = ELEMENTS.get((section, key))
    if elem is not None and v is not None:
        bad = [x for x in v if not isinstance(x, elem)]
        if bad:
            raise MoepressError(f"{key_where(src, section, key)}: expected a list of {elem.__name__}, got {bad[0]!r}")
        twice = next((x for x in v if v.count(x) > 1), None)
        if twice is not None:  # a format listed twice ran once and was reported skipped
            raise MoepressError(f"{key_where(src, section, key)}: {twice!r} listed twice")
    if (section, key) in POSITIVE and v is not None and v < 1:
        raise MoepressError(f"{key_where(src, section, key)}: expected a positive number, got {v!r}")
    if key == "seed" and isinstance(v, int) and not -(2**63) <= v < 2**63:  # torch's generator takes 64 bits
        raise MoepressError(f"{key_where(src, section, key)}: expected a 64-bit integer, got {v!r}")
    if (section, key) == ("export", "formats"):  # refused by run's preflight too, but `recipe show` passed it
        from moepress.exporters import exporters

        names = exporters()
        bad = [f for f in v if f not in names]
        if bad:
            raise MoepressError(f"{key_where(src, section, key)} {bad[0]}: expected one of {', '.join(names)}")
    if (section, key) == ("build", "targets"):
        from moepress.exporters.targets import TARGETS, get_target

        seen: dict[str, str] = {}
        for t in v:
            try:
                name = get_target(t).name
            except MoepressError:
                raise MoepressError(f"{key_where(src, section, key)}: unknown GPU target {t!r}; expected one of "
                                    f"{', '.join(TARGETS)}") from None
            if name in seen:
                raise MoepressError(f"{key_where(src, section, key)}: {t!r} and {seen[name]!r} are one GPU ({name})")
            seen[name] = t


def _home(path):
    """``~`` and ``~/...`` expanded as a shell would (a string only)."""
    return os.path.expanduser(path) if isinstance(path, str) and path.startswith("~") else path


def _yaml_hint(v, typ) -> str:
    """Why YAML (1.1, as PyYAML reads it) gave another type than the one written, where that is likely."""
    if isinstance(v, bool):
        return " (YAML reads yes / no / on / off as true / false: quote it, or write none where a gate takes it)"
    if typ is str and isinstance(v, (int, float)):
        return " (YAML read it as a number, 3:5 too: quote it)"
    if isinstance(v, str) and typ in (float, (float, int)):
        try:
            float(v)
        except ValueError:
            return ""
        if "e" in v.lower() and "." not in v.lower().split("e")[0]:
            return " (YAML 1.1 reads an exponent without a dot as text: write 0.25 or 2.5e-1)"
        return " (a quoted number is text in YAML: leave the quotes out)"
    return ""


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping: PyYAML keeps the last silently, so two
    quantize.rules with one pattern ran the later one, where --rule (first match wins) refuses the later."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for k, _ in node.value:
            if k.tag == "tag:yaml.org,2002:merge":  # ``<<: *anchor``: merged by the base loader, own keys win
                continue
            key = self.construct_object(k, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise yaml.constructor.ConstructorError(None, None, f"found a {type(key).__name__} as a key",
                                                        k.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"found duplicate key {key!r}", k.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        return _plain_number(node, super().construct_yaml_int(node))

    def construct_yaml_float(self, node):
        return _plain_number(node, super().construct_yaml_float(node))


def _plain_number(node, value):
    """``value``, unless YAML 1.1 read the number's text as octal (``010``: 8) or base 60 (``1:30``: 90), which a
    YAML 1.2 reader and the recipe's author read as written."""
    digits = node.value.lstrip("+-").replace("_", "")
    if ":" in digits or (len(digits) > 1 and digits[0] == "0" and digits[1].isdigit()):
        raise yaml.constructor.ConstructorError(None, None, f"{node.value!r} reads as {value} in YAML 1.1 (octal or "
                                                f"base 60); expected a number without leading zeros or colons, or "
                                                f"quote it", node.start_mark)
    return value


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", _UniqueKeyLoader.construct_yaml_float)


MAX_VALUES = 100_000  # a recipe's values, aliases expanded: a few hundred in any real one


def _expanded_over(obj, budget: int) -> bool:
    """Whether ``obj`` holds more than ``budget`` values counted as every later walk meets them: YAML aliases
    share one object, so ten aliases of ten aliases of ... load small and expand to billions (or, an alias of
    its own parent, without end) in the first json.dumps or copy of the recipe."""
    stack = [obj]
    while stack:
        budget -= 1
        if budget < 0:
            return True
        o = stack.pop()
        if isinstance(o, dict):
            stack += [*o.keys(), *o.values()]
        elif isinstance(o, list):
            stack += o
    return False


def load_recipe(path: str | Path | None = None, overrides: dict | None = None) -> tuple[dict, str]:
    """The effective recipe from ``path`` (None: the embedded default) and its source name."""
    p = Path(path) if path is not None else DEFAULT_RECIPE
    src = str(p) if path is not None else "default recipe"
    try:
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise MoepressError(f"{p}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MoepressError(f"{p}: cannot read the recipe ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise MoepressError(f"{p}:{where} not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except RecursionError:
        raise MoepressError(f"{p}: not a recipe (nested too deeply to read)") from None
    if _expanded_over(raw, MAX_VALUES):
        raise MoepressError(f"{p}: not a recipe (over {MAX_VALUES} values, its aliases expanded)")
    raw = raw or {}
    for key, value in (overrides or {}).items():
        raw[key] = value
    return normalise(raw, src), src


def dump(recipe: dict) -> str:
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)
