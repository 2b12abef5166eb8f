"""The pieces of a decoder layer that moepress owns: router, experts, sparse MoE block.

Attention and norms are transformers' own modules (built per family by the
adapters); the MoE block is ours so that every expert is a plain ``nn.Linear``
triple whose parameter names equal the checkpoint's tensor names
(``mlp.experts.7.down_proj.weight``, Mixtral ``block_sparse_moe.experts.7.w2.weight``).
That gives observers and quantizers one hook point per expert linear, and a layer's
``state_dict`` is exactly its slice of the checkpoint.

Routing functions live in the family adapters and replicate transformers exactly.
:class:`AttentionObserver` shows the key / value states a transformers attention module caches
(what FP8 KV-cache scales are measured on), leaving its output unchanged.
:class:`StoredLinear` is the linear a streamed layer holds where its weight stays as stored (bf16, or
quantized with its scales) or as moepress quantized it, made in the input's dtype at each call.
"""

from __future__ import annotations

import copy
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moepress.compress.checkpoint import LayerView

# route(moe, x2d) -> (router_logits, topk_weights [T, k], topk_indices [T, k])
RouteFn = Callable[["SparseMoE", torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def expert_rows(indices: torch.Tensor, num_experts: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert, tokens, slots) for every expert that ``indices`` [T, k] routes a token to, ascending expert id;
    ``tokens`` ascending, ``slots`` the top-k positions: what ``torch.where(indices == e)`` gives, for all
    experts from one stable sort and one host sync (on a GPU each ``torch.where`` waits for the device, and a
    Kimi K2 layer has 384 experts)."""
    k = indices.shape[-1]
    order = torch.argsort(indices.reshape(-1), stable=True)
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts).tolist()
    pos = 0
    for e, n in enumerate(counts):
        if n:
            rows = order[pos: pos + n]
            yield e, rows // k, rows % k
            pos += n


def expert_tokens(indices: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
    """Each expert's tokens (ascending; empty where ``indices`` [T, k] routes none to it), from
    :func:`expert_rows`' one sort, not a scan of ``indices`` per expert (O(experts x tokens) a layer)."""
    out = [indices.new_zeros(0, dtype=torch.long)] * num_experts
    for e, tokens, _ in expert_rows(indices, num_experts):
        out[e] = tokens
    return out


class MoEObserver(Protocol):
    """What a MoE block tells observers while it runs (all methods optional).

    on_route(moe, x, logits, weights, indices): once per forward, x is [T, H].
    on_expert(moe, e, tokens, slots, gate, x_e, y_e): per expert hit; tokens [n] index x,
        slots [n] the top-k position, gate [n] the routing weight, x_e its input [n, H]
        and y_e its output [n, H] before the routing weight is applied.
    """


class Router(nn.Module):
    """Router weight [E, H] and, for DeepSeek-V3/Kimi K2, the noaux_tc correction bias."""

    def __init__(self, num_experts: int, hidden: int, correction_bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        if correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
        else:
            self.e_score_correction_bias = None

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]


class ExpertMLP(nn.Module):
    """down(act(gate(x)) * up(x)), with the family's parameter names."""

    def __init__(self, hidden: int, inter: int, act: str = "silu",
                 names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        self.names = names
        g, u, d = names
        setattr(self, g, nn.Linear(hidden, inter, bias=False))
        setattr(self, u, nn.Linear(hidden, inter, bias=False))
        setattr(self, d, nn.Linear(inter, hidden, bias=False))
        from transformers.activations import ACT2FN  # here: importing this module (the planner, `moepress
        # formats`) needs no transformers; building a layer does (the families' attention is transformers')

        self.act_fn = ACT2FN[act]

    def linears(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return tuple(getattr(self, n) for n in self.names)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u, d = self.linears()
        return d(self.act_fn(g(x)) * u(x))


class SparseMoE(nn.Module):
    """Top-k routed experts (+ optional shared experts), observable per expert."""

    def __init__(self, gate: Router, experts: list[ExpertMLP], route: RouteFn,
                 shared_experts: ExpertMLP | None = None, layer_idx: int = -1, top_k: int = 1):
        super().__init__()
        self.gate = gate
        self.experts = nn.ModuleList(experts)
        if shared_experts is not None:
            self.shared_experts = shared_experts
        else:
            self.shared_experts = None
        self.route = route
        self.layer_idx = layer_idx
        self.top_k = top_k
        self.observers: list[MoEObserver] = []

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits, weights, indices = self.route(self, x)
        for obs in self.observers:
            fn = getattr(obs, "on_route", None)
            if fn is not None:
                fn(self, x, logits, weights, indices)
        out = torch.zeros_like(x)
        # Same order of accumulation as transformers' experts loop: ascending expert id.
        for e, tokens, slots in expert_rows(indices, self.num_experts):
            x_e = x[tokens]
            y_e = self.experts[e](x_e)
            gate = weights[tokens, slots]
            for obs in self.observers:
                fn = getattr(obs, "on_expert", None)
                if fn is not None:
                    fn(self, e, tokens, slots, gate, x_e, y_e)
            out.index_add_(0, tokens, (y_e * gate[:, None]).to(out.dtype))
        out = out.view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: h + attn(norm(h)), then h + ffn(norm(h)).

    ``ffn_attr`` is the family's name for the feed-forward block ("mlp", or Mixtral's
    "block_sparse_moe") so that state_dict names match the checkpoint.
    """

    def __init__(self, self_attn: nn.Module, ffn: nn.Module, input_layernorm: nn.Module,
                 post_attention_layernorm: nn.Module, ffn_attr: str = "mlp", layer_idx: int = -1):
        super().__init__()
        self.self_attn = self_attn
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm
        self.ffn_attr = ffn_attr
        setattr(self, ffn_attr, ffn)
        self.layer_idx = layer_idx

    @property
    def ffn(self) -> nn.Module:
        return getattr(self, self.ffn_attr)

    @property
    def moe(self) -> SparseMoE | None:
        f = self.ffn
        return f if isinstance(f, SparseMoE) else None

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.parts(hidden_states, position_embeddings, attention_mask)[2]

    def parts(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
              attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the attention block's output, the feed-forward block's output, the layer's output): the forward's
        steps, so that a check can hold each block to the reference's on the same input."""
        attn = self.attention(hidden_states, position_embeddings, attention_mask)
        h = hidden_states + attn
        ffn = self.ffn(self.post_attention_layernorm(h))
        return attn, ffn, h + ffn

    def attention(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention block's output (before the residual is added)."""
        h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                              position_embeddings=position_embeddings, attention_mask=attention_mask)
        return h


# ---- observable attention ----------------------------------------------------------------------

OBSERVED_ATTENTION = "moepress-observed"  # our entry in transformers' AttentionInterface registry


def _observed_attention(module: nn.Module, query, key, value, *args, **kwargs):
    """Tell the observer the key / value states (an observer returning a pair replaces them: the KV cache a
    runtime quantizes), then run the module's own attention function."""
    obs: AttentionObserver = module.moepress_observer
    got = obs.on_kv(key, value)
    if got is not None:
        key, value = got
    return obs.delegate(module, query, key, value, *args, **kwargs)


class AttentionObserver:
    """Calls ``on_kv(key, value)`` with the key and value states a transformers attention module
    hands its attention function, until :meth:`remove` (a hook handle's interface).

    Those are the tensors of ``attention_interface(self, query_states, key_states, value_states,
    ...)`` in transformers' modeling files (5.24: models/{qwen3_moe,mixtral,deepseek_v3}/
    modeling_*.py): after the family's k_norm and RoPE, exactly what the module's ``cache.update``
    stores for Qwen3-MoE / Mixtral; for DeepSeek-V3's MLA the keys and values decompressed by
    ``kv_b_proj`` (its cache holds the latent). Model-Optimizer's ``_QuantAttention`` observes the
    same tensors with its k/v bmm quantizers (modelopt 0.47, modelopt/torch/quantization/plugins/
    huggingface.py: ``_quantized_attention``).

    How: transformers' attention modules look their attention function up at every forward in
    ``ALL_ATTENTION_FUNCTIONS`` under ``self.config._attn_implementation``. We register one
    function there (``AttentionInterface.register``, its public extension point) and point this
    module alone at it through its own copy of the config; the function forwards to the
    implementation the module had, with the same arguments, so the module's output is unchanged.
    Unlike modelopt, which swaps the ``sdpa`` entry of the global registry while the module runs,
    nothing another module reads changes. Preferred to wrapping ``apply_rotary_pos_emb`` (a
    function each modeling file holds under its own name, MLA's under two) and to handing the
    module a recording cache (its keyword was renamed ``past_key_values`` -> ``cache`` within
    transformers 5, and for MLA it would see the latent, not what modelopt measures).
    """

    def __init__(self, attn: nn.Module, on_kv: Callable[[torch.Tensor, torch.Tensor], tuple | None]):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

        if OBSERVED_ATTENTION not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(OBSERVED_ATTENTION, _observed_attention)
        # the module holds its observer; the observer holds the module weakly: a layer dropped (the stream lets each
        # go) is freed at once, not at the garbage collector's next cycle with its stored weights
        self.attn, self.on_kv, self.config = weakref.ref(attn), on_kv, attn.config
        impl = self.config._attn_implementation
        eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
        self.delegate = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
        if self.delegate is None:
            raise TypeError(f"{type(attn).__name__}: no attention function for {impl!r} to observe")
        observed = copy.deepcopy(self.config)
        observed._attn_implementation = OBSERVED_ATTENTION
        attn.config, attn.moepress_observer = observed, self

    def remove(self) -> None:
        attn = self.attn()
        if attn is not None:
            attn.config = self.config
            del attn.moepress_observer


class StoredLinear(nn.Linear):
    """An ``nn.Linear`` whose weight stays as stored and is made in the input's dtype at each call:
    bf16 cast (bf16 -> float32 is exact), or a weight stored quantized (FP8: DeepSeek / Kimi K2 block
    FP8, Model-Optimizer FP8; packed INT4 / FP4: Kimi K2 Thinking's experts, MXFP4, NVFP4) kept as
    stored with its scales (:meth:`keep`) and decoded by the checkpoint's own decoder; once quantized
    by moepress it is kept quantized (``qweight``: a function returning the dequantized weight) and
    dequantized at each call. Each gives the values a float32 copy of the layer holds, so the forward
    is bit-identical to one over such a copy, at half the memory (bf16), a quarter (FP8) or about an
    eighth (INT4). Still an ``nn.Linear``: hooks and names unchanged.
    """

    qweight: Callable[[], torch.Tensor] | None = None
    kept: tuple[str, ...] = ()  # checkpoint names of the stored tensors kept as buffers kept_0, kept_1, ...

    def keep(self, reader, name: str, stored: dict[str, torch.Tensor]) -> None:
        """Keep the weight ``name`` as stored (``stored``: it and its scales), decoded at each call. Its
        ``weight`` is a meta tensor of the layer's shape: code reading it instead of :meth:`stored_weight`
        fails loudly rather than computing with undecoded bytes."""
        self.kept_reader, self.kept_name, self.kept = reader, name, tuple(stored)
        for j, t in enumerate(stored.values()):
            self.register_buffer(f"kept_{j}", t, persistent=False)  # moved and released with the layer

    def stored_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The stored weight in ``dtype``: decoded (kept quantized) or cast (bf16)."""
        if self.kept:
            return LayerView(self.kept_reader, self.kept_tensors()).weight(self.kept_name, dtype)
        return self.weight.to(dtype)

    def drop_stored(self) -> None:
        """Let go of the stored weight (the layer is quantized: ``qweight`` or nothing reads it again)."""
        self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype), requires_grad=False)
        for j in range(len(self.kept)):
            del self._buffers[f"kept_{j}"]
        self.kept = ()

    def kept_tensors(self) -> dict[str, torch.Tensor]:
        """The kept weight's stored tensors by checkpoint name (empty unless :meth:`keep`)."""
        return {n: getattr(self, f"kept_{j}") for j, n in enumerate(self.kept)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qweight().to(x.dtype) if self.qweight is not None else self.stored_weight(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def first_non_finite(module: nn.Module) -> tuple[str, int] | None:
    """(name, count) of ``module``'s first decoded weight holding NaN / Inf values, None where all are finite;
    one host sync where all are."""
    finite = [torch.isfinite(p).all() for _, p in decoded_weights(module)]
    if not finite or bool(torch.stack(finite).all()):
        return None
    return next((n, int((~torch.isfinite(p)).sum())) for n, p in decoded_weights(module)
                if not bool(torch.isfinite(p).all()))


def decoded_weights(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every floating-point parameter of ``module`` by name, a weight kept quantized decoded to float32
    (:meth:`StoredLinear.stored_weight`), one at a time: what its forward computes with (a corrupt scale
    shows there as NaN / Inf)."""
    for n, m in module.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            if pn == "weight" and isinstance(m, StoredLinear) and m.kept:
                yield f"{n}.weight" if n else "weight", m.stored_weight(torch.float32)
            elif p.is_floating_point():
                yield f"{n}.{pn}" if n else pn, p
