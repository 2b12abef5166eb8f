"""Architecture adapters, one file per family, looked up by config.model_type / architectures.

The built-in adapters are registered here on first use rather than at import: each one imports
its transformers modeling module, which is slow to import.
"""

from __future__ import annotations

from collections.abc import Iterable

from moepress.errors import MoepressError

FAMILIES: dict[str, type] = {}
_builtin_loaded = False


def register(cls):
    FAMILIES[cls.family] = cls
    return cls


def _load_all() -> None:
    global _builtin_loaded
    if _builtin_loaded:
        return
    from moepress.compress.arch import deepseek_v3, mixtral, qwen3_moe

    for cls in (deepseek_v3.DeepseekV3Adapter, qwen3_moe.Qwen3MoeAdapter, mixtral.MixtralAdapter):
        register(cls)
    _builtin_loaded = True


def adapter_class(config: dict, where: str = "config.json"):
    """The family of ``config`` by its ``model_type``, the key transformers' AutoConfig (and vLLM, through it)
    builds the model's config by: a checkpoint whose model_type is missing or another one's loads in neither,
    though its ``architectures`` name one of ours, so it is refused (a check built with the family's own
    config would pass what its consumers cannot load)."""
    _load_all()
    mt = config.get("model_type")
    archs = config.get("architectures") or []
    for cls in FAMILIES.values():
        if mt in cls.model_types:
            return cls
    supported = ", ".join(sorted(t for c in FAMILIES.values() for t in c.model_types))
    ours = next((c for c in FAMILIES.values() if any(a in c.architectures for a in archs)), None)
    if ours is not None:
        raise MoepressError(f"{where}: model_type {mt!r} with architectures {archs}; expected model_type "
                            f"{' or '.join(repr(t) for t in ours.model_types)} (transformers and vLLM build the "
                            "model's config by its model_type)")
    raise MoepressError(f"{where}: unsupported architecture (model_type={mt!r}, architectures={archs}); "
                        f"expected an MoE family: {supported}")


def get_adapter(config: dict, names: Iterable[str] | None = None, where: str = "config.json"):
    return adapter_class(config, where)(config, names, where)


def transformers_config(config: dict, where: str = "config.json"):
    """The family's transformers config object where transformers cannot build config.json's own (Kimi K2's
    ``kimi_k2`` is remote code; its layers are DeepSeek-V3's, as vLLM maps it): what AutoTokenizer and
    AutoModelForCausalLM take as ``config=``. None where transformers knows the model_type or the family
    is not one of ours."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(config, dict) or config.get("model_type") in CONFIG_MAPPING:
        return None
    try:
        cls = adapter_class(config, where)
    except MoepressError:
        return None
    return cls(config, None, where).hf_config

