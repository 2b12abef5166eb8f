"""The ``ignore`` list of a compressed-tensors export, written as Kimi writes it where it can be.

Kimi K2 Thinking / K2.5 / K2.6 quantize only the routed experts and keep the rest in bf16 with four
patterns instead of one entry per module (moonshotai/Kimi-K2-Thinking config.json
``quantization_config.ignore``): ``lm_head``, ``re:.*self_attn.*``, ``re:.*shared_experts.*`` and
``re:.*mlp\\.(gate|up|gate_up|down)_proj.*`` (the dense MLP layers). Routers are not listed there:
DeepSeek-V3's ``mlp.gate`` is not an ``nn.Linear`` in transformers' or vLLM's modules, so the
``Linear`` target never reaches it; Mixtral's and Qwen3-MoE's routers are Linears, and one more
pattern, ``re:.*\\.gate$``, keeps them, so the rule holds for every family.

compressed-tensors matches an entry by exact name or, prefixed ``re:``, by ``re.match``
(compressed_tensors 0.20.1 ``utils/match.py`` ``match_name``); vLLM does the same
(``compressed_tensors_utils.py`` ``should_ignore_layer``). The patterns are used only when they say
exactly what the explicit list says: every high-precision module matched, no quantized one.

Where they do not, a long list (more than COLLAPSE_AT names, e.g. a Kimi-sized model's experts left bf16: tens of
thousands) is folded into ``re:`` patterns that vary the layer and expert numbers (``collapsed``): both libraries
test every module against every entry when they load.
"""

from __future__ import annotations

import re

COLLAPSE_AT = 512
_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)")  # a layer or expert number: a dotted part of digits

KIMI_IGNORE = ("lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*")
ROUTERS = "re:.*\\.gate$"


def matches(entry: str, name: str) -> bool:
    """Does a compressed-tensors ignore / target entry select module ``name``?"""
    return re.match(entry[3:], name) is not None if entry.startswith("re:") else entry == name


def condensed(ignore: list[str], quantized: set[str]) -> list[str]:
    """Kimi's ignore patterns (plus the router pattern where routers are ignored) when they select
    exactly the modules of ``ignore`` among ``ignore`` and ``quantized``; else ``ignore`` unchanged."""
    patterns = list(KIMI_IGNORE)
    if any(matches(ROUTERS, n) for n in ignore):
        patterns.append(ROUTERS)
    covered = all(any(matches(p, n) for p in patterns) for n in ignore)
    clean = not any(matches(p, q) for p in patterns for q in quantized)
    return patterns if ignore and covered and clean else collapsed(ignore, quantized)


def _template(name: str, last_only: bool) -> str:
    """``name`` as a regex over names with other numbers where it has its numbers (all, or its last one)."""
    spans = [m.span() for m in _NUMBER.finditer(name)][-1 if last_only else 0:]
    out, at = [], 0
    for a, b in spans:
        out += [re.escape(name[at:a]), r"\d+"]
        at = b
    return "".join(out) + re.escape(name[at:]) + "$"


def collapsed(ignore: list[str], quantized: set[str]) -> list[str]:
    """``ignore`` (module names) with the names that differ only in their numbers folded into one ``re:`` pattern
    each, where the pattern selects no ``quantized`` module: all numbers varied (every layer), else the last one
    (every expert of a layer), else the name kept. A name matches a pattern exactly when it has the pattern's
    template, so each pattern selects exactly the names it replaces. Lists of COLLAPSE_AT names or fewer are kept
    as they are."""
    if len(ignore) <= COLLAPSE_AT:
        return ignore
    out: dict[str, None] = {}
    for last_only in (False, True):
        dirty = {_template(q, last_only) for q in quantized}
        rest = []
        for n in ignore:
            t = _template(n, last_only)
            if _NUMBER.search(n) and t not in dirty:
                out["re:" + t] = None
            else:
                rest.append(n)
        ignore = rest
    return list(out) + ignore
