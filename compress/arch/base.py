"""What every architecture adapter knows: checkpoint layout, config keys, routing, layer building."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import ClassVar

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from moepress.compress.moe import DecoderLayer, ExpertMLP, Router, SparseMoE
from moepress.errors import MoepressError

TOP_K_KEY = "num_experts_per_tok"  # experts each token is routed to, in every supported family's config
# counts past which a config is refused before anything is built from it (a config-only inspect builds each
# layer's modules: a count such as 10^9 experts would run until memory runs out): far above any released model's
# (Kimi K2: 61 layers, 384 routed experts), low enough that inspect and plan take seconds
MAX_LAYERS = 1024
MAX_EXPERTS = 8192


# per-family widths (DeepSeek's MLA ranks, Qwen3's head_dim, the MLP widths): whole numbers >= 1 where set
SIZE_KEYS = ("head_dim", "intermediate_size", "moe_intermediate_size", "q_lora_rank", "kv_lora_rank",
             "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
# rope parameters (transformers' modeling_rope_utils) that only a positive number makes sense of
ROPE_POSITIVE = ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "beta_fast",
                 "beta_slow")


def is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


class Adapter:
    """One MoE family. Subclasses set the class attributes and implement the hooks below.

    An adapter is built from a checkpoint's config.json (a dict) and, when known, the
    checkpoint's tensor names (a family may have more than one naming on disk).
    """

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    architectures: ClassVar[tuple[str, ...]]
    experts_keys: ClassVar[tuple[str, ...]]  # config keys for the routed-expert count
    layer_kind_keys: ClassVar[tuple[str, ...]] = ()  # config keys that make a layer dense or MoE
    scoring: ClassVar[str] = "softmax"
    ffn_attr: ClassVar[str] = "mlp"
    expert_names: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
    # the KV cache holds a compressed latent, not the keys / values k_scale / v_scale are measured on (MLA)
    latent_kv_cache: ClassVar[bool] = False
    # per-head RMSNorm of q and k before rotary (self_attn.q_norm / k_norm): the exporters write it
    qk_norm: ClassVar[bool] = False
    # linears (name suffixes) a runtime dequantizes by running its quant method on an identity matrix
    # (vLLM's MLA kv_b_proj split): a static FP8 or NVFP4 input scale there must quantize 1.0 exactly
    # (compress/quant/fp8.py identity_exact_input_scale)
    identity_dequantized: ClassVar[tuple[str, ...]] = ()
    # transformers' config class counts multi-token-prediction layers when config.json does not (DeepSeek-V3:
    # num_nextn_predict_layers defaults to 1): an output without them must say num_nextn_predict_layers=0
    nextn_by_default: ClassVar[bool] = False

    def __init__(self, config: dict, names: Iterable[str] | None = None, where: str = "config.json"):
        self.config = dict(config)
        missing = [k for k in ("hidden_size", "num_hidden_layers", "vocab_size") if config.get(k) is None]
        if missing or self.experts_key() is None:
            need = missing or [" or ".join(self.experts_keys)]
            raise MoepressError(f"{where}: {self.family} config lacks {', '.join(need)}")
        counts = {k: config[k] for k in self.experts_keys if config.get(k) is not None}
        if len({repr(v) for v in counts.values()}) > 1:  # transformers reads whichever the file sets last
            raise MoepressError(f"{where}: {' and '.join(f'{k}={v!r}' for k, v in counts.items())} disagree: expected "
                                "one routed-expert count")
        set_top_k = TOP_K_KEY in self.config
        if set_top_k:  # before transformers' typed config refuses it with a multi-line message
            self._check_expert_counts(where, self.config[TOP_K_KEY])
        self._check_raw(where)
        try:
            self.hf_config = self.make_hf_config(self.config)
        except (TypeError, ValueError, KeyError, StrictDataclassError) as e:
            # huggingface_hub's strict dataclasses (transformers 5 configs) say
            # "Validation error for field 'x':\n    TypeError: Field 'x' expected int, got str (value: ...)";
            # its rope validation raises KeyError("Missing required keys in `rope_parameters` ...")
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            last = str(msg).strip().splitlines()[-1].strip().removeprefix("TypeError: ").removeprefix("ValueError: ")
            raise MoepressError(f"{where}: {last}") from None
        self.hf_config._attn_implementation = "sdpa"
        if not set_top_k:  # transformers' default applies
            self._check_expert_counts(where, getattr(self.hf_config, TOP_K_KEY, None), default=True)
        self._check_common(where)
        self.check_config(where)
        try:  # the rotary embedding's frequencies from the rope parameters, as every layer stream builds them
            self.build_rotary()
        except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:
            raise MoepressError(f"{where}: rope parameters {self._rope()!r}: {e}") from None

    def _check_common(self, where: str) -> None:
        """Refuse what every family's layers would fail on later with a traceback (or silently build
        nothing from): sizes that are not whole numbers >= 1, an activation transformers does not know."""
        from transformers.activations import ACT2FN

        c = self.hf_config
        for key in ("num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads"):
            v = self.config.get(key, getattr(c, key, 1))
            if v is not None and not is_count(v):
                raise MoepressError(f"{where}: {key}={v!r}: expected a whole number >= 1")
        for key in SIZE_KEYS:  # widths a layer is built with, where the config sets them (null: the family's default)
            v = self.config.get(key)
            if v is not None and not is_count(v):
                raise MoepressError(f"{where}: {key}={v!r}: expected a whole number >= 1")
        # every KV head serves heads / kv query heads; as written (DeepSeek's config class fills in 128 where the file
        # leaves it out, and its MLA attention reads no KV head count)
        heads, kv = self.config.get("num_attention_heads"), self.config.get("num_key_value_heads")
        if self.config.get("kv_lora_rank") is None and is_count(heads) and is_count(kv) and heads % kv:
            raise MoepressError(f"{where}: num_key_value_heads={kv}: expected a divisor of num_attention_heads={heads}")
        act = getattr(c, "hidden_act", "silu")
        if act not in ACT2FN:
            raise MoepressError(f"{where}: hidden_act={act!r}: expected one of transformers' activations "
                                f"(e.g. silu, gelu)")
        eps = self.config.get("rms_norm_eps")  # NaN or < 0: every norm's output NaN, the stages ran on (exit 0)
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 1):
            raise MoepressError(f"{where}: rms_norm_eps={eps!r}: expected a small positive number (e.g. 1e-6)")
        w = self.config.get("sliding_window")  # <= 0: a window of no tokens, which the calibration forward took
        if w is not None and not is_count(w):
            raise MoepressError(f"{where}: sliding_window={w!r}: expected a whole number of positions >= 1, or null")

    def _check_raw(self, where: str) -> None:
        """Before transformers' config class sees them (it raises or logs): a layer count past ``MAX_LAYERS``, a
        dtype that is not a torch dtype's name, a rope type or theta that rotary embeddings cannot use."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        layers = self.config.get("num_hidden_layers")
        if is_count(layers) and layers > MAX_LAYERS:  # before transformers' config makes per-layer lists of it
            raise MoepressError(f"{where}: num_hidden_layers={layers}: expected at most {MAX_LAYERS}")

        v = self.config.get("max_position_embeddings")  # 0 read as unset (a plan of 4096), -5 as a --max-seq-len
        if v is not None and not is_count(v):
            raise MoepressError(f"{where}: max_position_embeddings={v!r}: expected a positive whole number")
        vocab = self.config.get("vocab_size")
        for key in ("bos_token_id", "eos_token_id"):  # copied into every output (generation stops on no such
            # token); checked before transformers' config class logs it
            v = self.config.get(key)
            ids = v if isinstance(v, list) else [v]
            if v is not None and not all(type(t) is int and 0 <= t < (vocab if is_count(vocab) else t + 1)
                                         for t in ids):
                below = f" below vocab_size {vocab}" if is_count(vocab) else ""
                raise MoepressError(f"{where}: {key}={v!r}: expected a token id (or a list of them){below}")
        for key in ("dtype", "torch_dtype"):
            v = self.config.get(key)
            if v is not None and v != "auto" and not (isinstance(v, str) and isinstance(getattr(torch, v, None),
                                                                                           torch.dtype)):
                raise MoepressError(f"{where}: {key}={v!r}: expected a torch dtype name such as \"bfloat16\"")
        rope = self._rope()
        if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
            return  # per-layer-type sets (or a malformed value) are left to transformers' own validation
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default" and kind not in ROPE_INIT_FUNCTIONS:
            raise MoepressError(f"{where}: rope_type {kind!r}: expected one of default, "
                                f"{', '.join(sorted(ROPE_INIT_FUNCTIONS))}")
        for key in ROPE_POSITIVE:  # scalings transformers takes as given: a negative factor scales frequencies by < 0
            v = rope.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not v > 0):
                raise MoepressError(f"{where}: rope parameter {key}={v!r}: expected a positive number")
        theta = rope.get("rope_theta", self.config.get("rope_theta", 1.0))
        if isinstance(theta, bool) or not isinstance(theta, int | float) or not theta > 0:
            raise MoepressError(f"{where}: rope_theta={theta!r}: expected a positive number")

    def _rope(self):
        """The config's rope parameters (transformers 5 ``rope_parameters``, or 4.x's ``rope_scaling``); {} if none."""
        return self.config.get("rope_parameters") or self.config.get("rope_scaling") or {}

    def _check_expert_counts(self, where: str, top_k, default: bool = False) -> None:
        """Refuse expert counts no router can use, before any work: the routed-expert count a whole
        number >= 1 and top-k (``num_experts_per_tok``) a whole number in 1..experts (torch.topk
        over the router's scores needs k <= experts; a parameter count with more active than total
        parameters means the config is wrong)."""
        key = self.experts_key()
        n = self.config[key]
        if not is_count(n) or n > MAX_EXPERTS:
            raise MoepressError(f"{where}: {key}={n!r}: expected a whole number of routed experts in "
                                f"1..{MAX_EXPERTS}")
        if not is_count(top_k) or top_k > n:
            said = f"{TOP_K_KEY} not set, transformers' default {top_k!r}" if default else f"{TOP_K_KEY}={top_k!r}"
            raise MoepressError(f"{where}: {said} with {key}={n}: expected a whole number of experts "
                                f"per token in 1..{n}")

    # ---- hooks for subclasses --------------------------------------------------------------
    def check_config(self, where: str) -> None:
        """Refuse the family's own config keys that no layer could be built or routed with."""

    def make_hf_config(self, config: dict):
        raise NotImplementedError

    def build_attention(self, i: int) -> nn.Module:
        raise NotImplementedError

    def build_norm(self, size: int) -> nn.Module:
        raise NotImplementedError

    def build_rotary(self) -> nn.Module:
        raise NotImplementedError

    def route(self, moe: SparseMoE, x: torch.Tensor):
        raise NotImplementedError

    def is_moe_layer(self, i: int) -> bool:
        raise NotImplementedError

    def layer_kind(self, named: bool = True) -> str:
        """" (KEY=VALUE, ...)": the config keys that decide which layers are MoE ("" if none or not ``named``)."""
        keys = ", ".join(f"{k}={self.config.get(k)!r}" for k in self.layer_kind_keys if k in self.config)
        return f" ({keys})" if named and keys else ""

    def transformers_misreads(self) -> str | None:
        """How transformers (as of the version the exporters name) builds this config unlike moepress and the
        serving runtimes, or None: said by the exports transformers loads, refused by check's transformers kind."""
        return None

    def routing(self) -> dict:
        """Routing facts for inspect/stats: scoring, top_k, renormalisation, groups, bias."""
        raise NotImplementedError

    def dense_intermediate_size(self, i: int) -> int:
        return int(self.hf_config.intermediate_size)

    def moe_intermediate_size(self) -> int:
        return int(self.hf_config.moe_intermediate_size)

    def n_shared_experts(self) -> int:
        return 0

    def zero_width_linears(self, i: int) -> list[str]:
        """Layer ``i``'s linears (module names) that the family's transformers module builds with no rows or
        columns, and a checkpoint need not store: a consumer quantizing every ``Linear`` must be told to
        leave them alone (compressed-tensors cannot unpack an empty INT4 weight)."""
        return []

    # ---- facts ---------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.hf_config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.hf_config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    @property
    def top_k(self) -> int:
        return int(getattr(self.hf_config, TOP_K_KEY))

    def experts_key(self) -> str | None:
        for k in self.experts_keys:
            if self.config.get(k):
                return k
        return None

    @property
    def num_experts(self) -> int:
        return int(self.config[self.experts_key()])

    def layer_shape_key(self, i: int) -> tuple:
        """Layers with equal keys have parameters of the same names (after the layer prefix) and
        shapes, so one layer built on the meta device tells them all (the stream checks every
        layer's stored shapes up front). A family whose layers differ otherwise extends the key."""
        return ("moe",) if self.is_moe_layer(i) else ("dense", self.dense_intermediate_size(i))

    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    def mtp_layers(self) -> list[int]:
        """Multi-token-prediction layers stored after the trunk: none but in DeepSeek-V3's family."""
        return []

    def mtp_extra_params(self) -> tuple[int, int]:
        """(other, embedding) parameters an MTP layer stores beside its decoder layer."""
        return 0, 0

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    # ---- checkpoint names ----------------------------------------------------------------------
    embed_name: ClassVar[str] = "model.embed_tokens.weight"
    norm_name: ClassVar[str] = "model.norm.weight"
    head_name: ClassVar[str] = "lm_head.weight"

    def layer_prefix(self, i: int) -> str:
        return f"model.layers.{i}."

    def router_prefix(self, i: int) -> str:
        return f"{self.layer_prefix(i)}{self.ffn_attr}.gate."

    def expert_prefix(self, i: int, e: int) -> str:
        return f"{self.layer_prefix(i)}{self.ffn_attr}.experts.{e}."

    def expert_index(self, name: str) -> tuple[int, int] | None:
        """(layer, expert) for a routed-expert tensor name, else None."""
        m = re.match(rf"model\.layers\.(\d+)\.{re.escape(self.ffn_attr)}\.experts\.(\d+)\.", name)
        return (int(m.group(1)), int(m.group(2))) if m else None

    def picked_by_index(self, match: Callable[[int, str], bool]) -> tuple[int, list[str], list[str]] | None:
        """The first MoE layer and expert projection where ``match(layer, module name)`` selects some routed
        experts and not others: (layer, the projection's expert names, those matched); None when it treats
        every expert of each layer alike. Pruning renumbers experts, so such a selection names others after."""
        for i in self.moe_layers():
            for proj in self.expert_names:
                names = [self.expert_prefix(i, e) + proj for e in range(self.num_experts)]
                hits = [n for n in names if match(i, n)]
                if 0 < len(hits) < len(names):
                    return i, names, hits
        return None

    def keep_fp32(self, name: str) -> bool:
        """Tensors kept in float32 whatever the compute dtype (router scores need it)."""
        return ".gate." in name and (name.endswith("e_score_correction_bias"))

    # ---- building ------------------------------------------------------------------------------
    def build_experts(self, num: int) -> list[ExpertMLP]:
        act = self.hf_config.hidden_act
        return [ExpertMLP(self.hidden_size, self.moe_intermediate_size(), act, self.expert_names)
                for _ in range(num)]

    def build_ffn(self, i: int) -> nn.Module:
        act = self.hf_config.hidden_act
        if not self.is_moe_layer(i):
            return ExpertMLP(self.hidden_size, self.dense_intermediate_size(i), act, self.expert_names)
        shared = None
        if self.n_shared_experts():
            shared = ExpertMLP(self.hidden_size, self.moe_intermediate_size() * self.n_shared_experts(), act)
        gate = Router(self.num_experts, self.hidden_size, correction_bias=self.scoring == "sigmoid")
        return SparseMoE(gate, self.build_experts(self.num_experts), self.route, shared, i, self.top_k)

    def build_layer(self, i: int) -> DecoderLayer:
        """The decoder layer module, parameters uninitialised (build under torch.device('meta'))."""
        return DecoderLayer(self.build_attention(i), self.build_ffn(i), self.build_norm(self.hidden_size),
                            self.build_norm(self.hidden_size), self.ffn_attr, i)

    # ---- config rewriting ------------------------------------------------------------------------
    def config_with_experts(self, n: int) -> dict:
        """config.json with the routed-expert count set to n, under the key the source used."""
        out = dict(self.config)
        for k in self.experts_keys:
            if k in out:
                out[k] = n
        return out


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
