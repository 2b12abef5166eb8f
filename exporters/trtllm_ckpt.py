"""TensorRT-LLM checkpoint (``config.json`` + ``rank{N}.safetensors``) for ``trtllm-build``.

Layout facts, with their sources in NVIDIA/TensorRT-LLM:

* ``docs/source/architecture/checkpoint.md``: one ``config.json`` (``architecture``, ``dtype``,
  sizes, ``mapping``, ``quantization``) and one ``rank{N}.safetensors`` per rank of
  ``mapping.world_size`` with names ``transformer.vocab_embedding.weight``,
  ``transformer.layers.{i}.attention.qkv.weight``, ``...attention.dense.weight``,
  ``...input_layernorm.weight``, ``...post_layernorm.weight``, ``transformer.ln_f.weight``,
  ``lm_head.weight``.
* ``tensorrt_llm/layers/moe.py`` (``MixtureOfExperts``, ``MOEWeightWrapper``): ``mlp.router.weight``
  [E, H] float32 (RowLinear with ``tp_size=1``, never split); ``mlp.fc.weight``
  [E/ep, 2*I/moe_tp, H] = cat(stack(w3), stack(w1)) on the output dim (w3, up, BEFORE w1, gate;
  ``"fc": [experts.E.w3 ...] + [experts.E.w1 ...]``), split on dim 0 of each half (tp_dim 0);
  ``mlp.proj.weight`` [E/ep, H, I/moe_tp] split on the input dim (tp_dim 1). FP8:
  ``weights_scaling_factor`` [E/ep, 1] and ``activation_scaling_factor`` [1] float32 per MoE
  weight. Experts per rank: ``Mapping.ep_experts`` (contiguous blocks of E/ep).
* ``tensorrt_llm/mapping.py``: ``moe_tp_size * moe_ep_size == tp_size``;
  ``moe_tp_rank = tp_rank // moe_ep_size``, ``moe_ep_rank = tp_rank % moe_ep_size``.
* ``tensorrt_llm/quantization/layers.py`` (FP8Linear): ``weights_scaling_factor`` and
  ``activation_scaling_factor`` float32 [1]; dequantized weight = fp8 * weights_scaling_factor
  (modelopt's convention, amax / 448). ``attention.kv_cache_scaling_factor`` [1] for FP8 KV cache.
* ``tensorrt_llm/quantization/mode.py`` (QuantAlgo): ``"FP8"``; kv cache ``"FP8"``.
* ``tensorrt_llm/models/__init__.py`` (MODEL_MAP): ``MixtralForCausalLM`` -> LLaMAForCausalLM,
  ``Qwen3MoeForCausalLM`` -> QWenForCausalLM. ``tensorrt_llm/models/qwen/config.py``:
  ``qwen_type`` "qwen3_moe", ``hidden_act`` "swiglu", ``moe_intermediate_size``,
  ``mlp_only_layers``, ``decoder_sparse_step``, no attention bias; ``qwen/model.py`` builds the
  experts with ``moe_intermediate_size`` and Q/K RMSNorm (``attention.q_layernorm.weight``,
  ``attention.k_layernorm.weight`` [head_size]) for qwen3 / qwen3_moe (``qwen/convert.py``).

Releases that accept it: those whose ``PretrainedConfig`` reads a nested ``moe`` section (MoeConfig),
``quantization.quant_algo`` (QuantConfig) and ``mapping.moe_tp_size`` / ``moe_ep_size`` (the first such tag is
not pinned here). The v0.8-era ``PretrainedConfig.from_dict`` (modeling_utils.py at 27712aa7) reads
use_smooth_quant / enable_fp8 and Mapping(world_size, tp_size, pp_size) and refuses these tensor names;
``layers/moe.py`` at 03961722 still has MoeConfig.tp_mode and no moe_tp / moe_ep mapping. Qwen3-MoE needs a release
whose MODEL_MAP lists ``Qwen3MoeForCausalLM`` and whose QWen attention has ``qk_layernorm``
(the 2025 0.2x releases); the newest releases removed the TensorRT engine backend
(``docs/source/legacy/tensorrt-backend-removal.md``): there, use ``hf-modelopt`` (PyTorch backend).
DeepSeek-V3 / Kimi K2 never had a TensorRT-engine path: refused here.

Qwen3-MoE note: TensorRT-LLM's own converter writes ``normalization_mode`` NONE for every Qwen
MoE; we write RENORMALIZE (1) when ``norm_topk_prob`` is set because that is what the model
computes (transformers' Qwen3MoeTopKRouter renormalises the top-k probabilities).

Quantized inputs (a ``moepress quantize`` output): FP8 per-tensor (``weight_scale`` scalar, ``input_scale`` scalar)
is converted; TensorRT-LLM fuses q/k/v and w3/w1 into one weight with one scale, so members quantized with a smaller
scale are re-rounded to the fused (max) scale (exact for the max-scale member, within half an FP8 step otherwise, as
modelopt's own TRT-LLM export does). INT4 AWQ into this format is not written (partial): use ``compressed-tensors``
(quantized with ``--awq-fold``) for vLLM, or ``w4a8-awq`` + ``hf-modelopt`` for Mixtral / Qwen3-MoE.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from moepress.compress.arch import get_adapter
from moepress.compress.checkpoint import DTYPE_NAMES, CheckpointReader
from moepress.compress.quant.fp8 import requantize as fp8_requantize
from moepress.errors import MoepressError
from moepress.exporters.base import Exporter
from moepress.exporters.hf_common import open_source
from moepress.exporters.hf_modelopt import elsewhere_taken
from moepress.exporters.hints import HF_MODELOPT
from moepress.exporters.kv_cache import kv_split_problem
from moepress.exporters.linears import Linear, read_linear, refuse_fp4
from moepress.exporters.trtllm_refusals import WRITES, quant_algo, refuse_unwritten_attention

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---- pure tensor functions -------------------------------------------------------------------
def split_rows(w: torch.Tensor, parts: int, rank: int) -> torch.Tensor:
    return w.chunk(parts, dim=0)[rank].contiguous() if parts > 1 else w


def kv_rows(w: torch.Tensor, kv_heads: int, tp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s rows of k_proj / v_proj ([kv_heads * head_dim, in]): its share of the heads, or, at a tp
    that is a multiple of them, the whole head ``rank // (tp // kv_heads)``: TensorRT-LLM's converters replicate
    each KV head over tp / kv ranks (NVIDIA/TensorRT-LLM 0428c188 tensorrt_llm/models/convert_utils.py
    dup_kv_weight), and its attention layer runs ceil(kv / tp) KV heads a rank (layers/attention.py
    num_attention_kv_heads) while the config keeps num_key_value_heads."""
    if kv_heads >= tp:
        return split_rows(w, tp, rank)
    return split_rows(w, kv_heads, rank // (tp // kv_heads))


def split_cols(w: torch.Tensor, parts: int, rank: int) -> torch.Tensor:
    return w.chunk(parts, dim=-1)[rank].contiguous() if parts > 1 else w


# ---- a safetensors file written one tensor at a time -----------------------------------------
class StreamingSafetensors:
    """rank{N}.safetensors written as tensors arrive: data goes to a side file, the header
    (which must come first) is written at :meth:`close`. Memory: one tensor."""

    def __init__(self, path: Path):
        self.path = path
        self.data_path = path.with_suffix(".data.tmp")
        self.data_path.unlink(missing_ok=True)  # made new: never written through a link found there
        self.f = open(self.data_path, "wb")
        self.header: dict[str, dict] = {}
        self.offset = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous()
        n = t.numel() * t.element_size()
        self.header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [self.offset, self.offset + n]}
        if n:
            self.f.write(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own buffer, no copy
        self.offset += n

    def close(self) -> None:
        self.f.close()
        head = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        head += b" " * ((-len(head)) % 8)
        self.path.unlink(missing_ok=True)
        with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(struct.pack("<Q", len(head)))
            out.write(head)
            while chunk := data.read(64 << 20):
                out.write(chunk)
        os.unlink(self.data_path)


# ---- config ----------------------------------------------------------------------------------
SUPPORTED = ("mixtral", "qwen3_moe")
TRTLLM_ARCH = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def trtllm_config(adapter, cfg, quant_algo, kv_algo, dtype: str) -> dict:
    c = adapter.hf_config
    tp, ep = cfg.tp, cfg.ep
    # transformers 5 moves a hub config's top-level rope_theta (Qwen3-30B-A3B: 1e6) into rope_parameters
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0))
    head = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    routing = adapter.routing()
    out = {
        "architecture": TRTLLM_ARCH[adapter.family],
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": adapter.vocab_size,
        "hidden_size": adapter.hidden_size,
        "num_hidden_layers": adapter.num_layers,
        "num_attention_heads": int(c.num_attention_heads),
        "num_key_value_heads": int(c.num_key_value_heads),
        "head_size": head,
        "hidden_act": "swiglu",
        "intermediate_size": int(c.intermediate_size),
        "norm_epsilon": float(c.rms_norm_eps),
        "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": int(c.max_position_embeddings),
        "rotary_base": float(rope),
        "rotary_scaling": None,  # refuse_unwritten_attention: only unscaled rope is exported
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "tie_word_embeddings": adapter.tie_word_embeddings,
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1, "moe_tp_size": tp // ep, "moe_ep_size": ep},
        "quantization": {"quant_algo": quant_algo, "kv_cache_quant_algo": kv_algo, "group_size": 128,
                         "has_zero_point": False, "pre_quant_scale": False,
                         "exclude_modules": ["lm_head", "*router"] if quant_algo else None},
        # layers/moe.py MoeConfig: ExpertScaleNormalizationMode NONE=0, RENORMALIZE=1
        "moe": {"num_experts": adapter.num_experts, "top_k": adapter.top_k,
                "normalization_mode": 1 if routing["renormalize"] else 0,
                "sparse_mixer_epsilon": 0.01},
    }
    if adapter.family == "qwen3_moe":
        out.update({"qwen_type": "qwen3_moe", "moe_intermediate_size": adapter.moe_intermediate_size(),
                    "moe_shared_expert_intermediate_size": 0, "attn_bias": False, "mlp_bias": False,
                    "mlp_only_layers": list(c.mlp_only_layers or []),
                    "decoder_sparse_step": int(c.decoder_sparse_step), "qk_layernorm": True,
                    "seq_length": int(c.max_position_embeddings)})
    return out


def check_mapping(adapter, tp: int, ep: int) -> None:
    c = adapter.hf_config
    heads, kv = int(c.num_attention_heads), int(c.num_key_value_heads)
    if tp % ep:
        raise MoepressError(f"--ep {ep}: must divide --tp {tp} (TensorRT-LLM: moe_tp_size * moe_ep_size == tp_size)")
    if adapter.num_experts % ep:
        raise MoepressError(f"--ep {ep}: must divide the {adapter.num_experts} experts "
                            f"(TensorRT-LLM's fused MoE needs num_experts % ep == 0)")
    if heads % tp or kv_split_problem(kv, tp):  # it splits the KV heads, or replicates them
        raise MoepressError(f"--tp {tp}: must divide num_attention_heads={heads}, and divide num_key_value_heads={kv} "
                            "or be a multiple of it")
    inter = adapter.moe_intermediate_size()
    if inter % (tp // ep):
        raise MoepressError(f"--tp {tp} --ep {ep}: moe_tp_size={tp // ep} must divide the expert "
                            f"intermediate size {inter}")


# ---- the exporter ------------------------------------------------------------------------------
def _fuse_fp8(lins: list[Linear]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """FP8 members re-rounded to one shared (max) weight scale; activation scale = max."""
    s = max(float(x.scale) for x in lins)
    qs = [fp8_requantize(x.weight, float(x.scale), s) for x in lins]
    act = max(float(x.input_scale) if x.input_scale is not None else 0.0 for x in lins)
    return qs, torch.tensor([s], dtype=torch.float32), torch.tensor([act], dtype=torch.float32)


class _RankWriter:
    """Writes the checkpoint's tensors into every rank's file, one decoder layer at a time."""

    def __init__(self, src: Path, reader: CheckpointReader, adapter, cfg, files, qalgo, kvalgo, dtype: str):
        self.src, self.reader, self.a, self.files = src, reader, adapter, files
        self.tp, self.ep, self.moe_tp = cfg.tp, cfg.ep, cfg.tp // cfg.ep
        self.dtype = DTYPES[dtype]
        self.qalgo, self.kvalgo = qalgo, kvalgo

    def fp(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype)

    def put(self, r: int, name: str, t: torch.Tensor) -> None:
        self.files[r].add(name, t)

    def embeddings(self) -> None:
        emb = self.reader.get(self.a.embed_name)
        for r in range(self.tp):
            self.put(r, "transformer.vocab_embedding.weight", self.fp(emb))

    def attention(self, i: int) -> bool:
        """Layer i's attention; whether it is written in FP8 (the layer's experts follow it)."""
        reader, tp, fp = self.reader, self.tp, self.fp
        lp, tl = self.a.layer_prefix(i), f"transformer.layers.{i}."
        q, k, v, o = attn = [read_linear(reader, f"{lp}self_attn.{p}_proj", "--format trtllm-ckpt", WRITES)
                             for p in "qkvo"]
        quant = self.qalgo is not None and q.scheme == "tensor"
        if quant:
            (wq, wk, wv), s_qkv, a_qkv = _fuse_fp8([q, k, v])
            (wo,), s_o, a_o = _fuse_fp8([o])
        else:
            wq, wk, wv, wo = (fp(x.dequantize()) for x in attn)
        kv_heads = int(self.a.hf_config.num_key_value_heads)
        for r in range(tp):
            self.put(r, tl + "attention.qkv.weight",
                     torch.cat([split_rows(wq, tp, r), kv_rows(wk, kv_heads, tp, r), kv_rows(wv, kv_heads, tp, r)], 0))
            self.put(r, tl + "attention.dense.weight", split_cols(wo, tp, r))
            if quant:
                self.put(r, tl + "attention.qkv.weights_scaling_factor", s_qkv)
                self.put(r, tl + "attention.qkv.activation_scaling_factor", a_qkv)
                self.put(r, tl + "attention.dense.weights_scaling_factor", s_o)
                self.put(r, tl + "attention.dense.activation_scaling_factor", a_o)
            if self.kvalgo:
                kv = max(float(reader.get(lp + f"self_attn.{n}_scale")) for n in "kv")
                self.put(r, tl + "attention.kv_cache_scaling_factor", torch.tensor([kv], dtype=torch.float32))
            self.put(r, tl + "input_layernorm.weight", fp(reader.get(lp + "input_layernorm.weight")))
            self.put(r, tl + "post_layernorm.weight", fp(reader.get(lp + "post_attention_layernorm.weight")))
            if self.a.qk_norm:
                self.put(r, tl + "attention.q_layernorm.weight", fp(reader.get(lp + "self_attn.q_norm.weight")))
                self.put(r, tl + "attention.k_layernorm.weight", fp(reader.get(lp + "self_attn.k_norm.weight")))
        return quant

    def experts(self, i: int, quant: bool) -> None:
        a, tl = self.a, f"transformer.layers.{i}."  # a dense layer: refused before (refuse_unwritten_attention)
        router = self.reader.get(a.router_prefix(i) + "weight").float()
        for r in range(self.tp):
            self.put(r, tl + "mlp.router.weight", router)
        for r in range(self.tp):
            self._rank_experts(i, r, tl, quant)

    def _rank_experts(self, i: int, r: int, tl: str, quant: bool) -> None:
        """Rank r's experts: mapping.py: moe_tp_rank = tp_rank // ep, moe_ep_rank = tp_rank % ep."""
        a, moe_tp, fp = self.a, self.moe_tp, self.fp
        g, u, d = a.expert_names
        per_rank = a.num_experts // self.ep
        mtp, mep = r // self.ep, r % self.ep
        s_fc, s_proj, a_fc, a_proj = [], [], [], []
        fc = proj = None  # layers/moe.py: fc = cat([stack(w3...), stack(w1...)], dim=-2), filled in place
        for k, e in enumerate(range(mep * per_rank, (mep + 1) * per_rank)):
            ep_ = a.expert_prefix(i, e)
            lg, lu, ld = (read_linear(self.reader, ep_ + n, "--format trtllm-ckpt", WRITES) for n in (g, u, d))
            if quant:
                (qu, qg), s1, a1 = _fuse_fp8([lu, lg])
                (qd,), s2, a2 = _fuse_fp8([ld])
                s_fc.append(s1)
                s_proj.append(s2)
                a_fc.append(a1)
                a_proj.append(a2)
            else:
                qu, qg, qd = fp(lu.dequantize()), fp(lg.dequantize()), fp(ld.dequantize())
            up, gate, down = split_rows(qu, moe_tp, mtp), split_rows(qg, moe_tp, mtp), split_cols(qd, moe_tp, mtp)
            if fc is None:
                fc = torch.empty((per_rank, up.shape[0] + gate.shape[0], up.shape[1]), dtype=up.dtype)
                proj = torch.empty((per_rank, *down.shape), dtype=down.dtype)
            fc[k, : up.shape[0]], fc[k, up.shape[0]:], proj[k] = up, gate, down
        self.put(r, tl + "mlp.fc.weight", fc)
        self.put(r, tl + "mlp.proj.weight", proj)
        if quant:
            self.put(r, tl + "mlp.fc.weights_scaling_factor", torch.stack(s_fc))  # [E/ep, 1]
            self.put(r, tl + "mlp.proj.weights_scaling_factor", torch.stack(s_proj))
            self.put(r, tl + "mlp.fc.activation_scaling_factor", torch.stack(a_fc).amax(0))  # [1]
            self.put(r, tl + "mlp.proj.activation_scaling_factor", torch.stack(a_proj).amax(0))

    def tail(self) -> None:
        a, reader, tp = self.a, self.reader, self.tp
        norm = reader.get(a.norm_name)
        head = reader.get(a.head_name if a.head_name in reader else a.embed_name)
        pad = (-head.shape[0]) % tp  # _utils.pad_vocab_size: lm_head rows padded to a multiple of tp
        if pad:
            head = torch.cat([head, head.new_zeros(pad, head.shape[1])])
        for r in range(tp):
            self.put(r, "transformer.ln_f.weight", self.fp(norm))
            self.put(r, "lm_head.weight", self.fp(split_rows(head, tp, r)))


def export_trtllm(src: Path, writer, cfg, progress) -> dict:
    reader = CheckpointReader(src)
    adapter = get_adapter(reader.config, reader.names())
    EXPORTER.refuse_family(adapter.family, src)  # export() checks it; a direct call should too
    check_mapping(adapter, cfg.tp, cfg.ep)
    refuse_unwritten_attention(src, adapter, reader)
    dtype = cfg.float_dtype(reader, adapter)
    if dtype not in DTYPES:
        raise MoepressError(f"export dtype {dtype}: expected one of {', '.join(DTYPES)}")
    qalgo, kvalgo = refuse_input(src, reader, adapter)  # before the first rank's tensors, not mid-way
    config = trtllm_config(adapter, cfg, qalgo, kvalgo, dtype)
    writer.write_json("config.json", config)
    files = [StreamingSafetensors(writer.partial / f"rank{r}.safetensors") for r in range(cfg.tp)]
    w = _RankWriter(src, reader, adapter, cfg, files, qalgo, kvalgo, dtype)
    w.embeddings()
    with progress.task("export trtllm-ckpt", adapter.num_layers) as task:
        for i in range(adapter.num_layers):
            w.experts(i, w.attention(i))
            task.advance(note=f"layer {i}")
    w.tail()
    for f in files:
        f.close()
    writer.copy_aux_files(src)
    return {"trtllm": {"architecture": config["architecture"], "quant_algo": qalgo, "kv_cache_quant_algo": kvalgo,
                       "mapping": config["mapping"], "ranks": [f.path.name for f in files], "dtype": dtype}}


def _other_families(src) -> str:
    """What a DeepSeek-V3 / Kimi K2 checkpoint uses instead, for this checkpoint (hints.elsewhere)."""
    where = "DeepSeek-V3 / Kimi K2 run only in TensorRT-LLM's PyTorch backend (no trtllm-build engine path)"
    try:
        s = open_source(Path(src))
        return f"{where}; for this checkpoint: {elsewhere_taken(s)}"
    except MoepressError:
        return f"{where}: {HF_MODELOPT}"


def refuse_input(src: Path, reader: CheckpointReader | None = None, adapter=None) -> tuple[str | None, str | None]:
    """The stored forms it does not write: FP4 weights, anything but FP8 per tensor in every decoder linear; else
    (quant_algo, kv_cache_quant_algo). ``reader`` / ``adapter``: the export's own, opened once."""
    reader = reader or CheckpointReader(src)
    adapter = adapter or get_adapter(reader.config, reader.names())
    refuse_fp4(reader, adapter, "--format trtllm-ckpt", WRITES)
    return quant_algo(reader, adapter)


EXPORTER = Exporter(
    "trtllm-ckpt", export_trtllm, description="TensorRT-LLM checkpoint (config.json + rank{N}.safetensors) "
    "for trtllm-build", families=SUPPORTED, sharded=True, other_families=_other_families,
    refuse_source=refuse_unwritten_attention, refuse_input=refuse_input,
    consumers="TensorRT-LLM trtllm-build (releases with MoeConfig and moe_tp / moe_ep mapping, TensorRT backend)",
    writes_format=lambda f: f.scale == "tensor" and f.static_input,  # WRITES: FP8 per tensor
)
