"""What SGLang 0.5.23 would do loading a Model-Optimizer (hf-modelopt) or DeepSeek block-FP8 (hf-fp8-block)
export: an independent re-implementation (no moepress import) of the names, shapes, dtypes and assertions of
its loader, for DeepSeek-V3 / Kimi K2, Qwen3-MoE and Mixtral; MIXED_PRECISION on either route SGLang takes (C14-C18).

    python tools/sglang_check.py EXPORT_DIR [EXPORT_DIR ...]

Prints one line per finding: FAIL (SGLang refuses or crashes), WRONG (loads, computes something else),
NOTE (read differently than written, harmless); exit 1 when any FAIL / WRONG.

Sources (sglang-0.5.23 wheel, python/sglang/...):
  C1 srt/configs/model_config.py:1727-1742,1838-1900  config.json quantization_config (quant_method modelopt) ->
     quant_algo FP8 -> modelopt_fp8, *FP4* -> modelopt_fp4, else not ModelOpt
  C2 srt/layers/quantization/modelopt_quant.py:309-424  exclude_modules: glob -> regex fullmatch on the prefix or
     any dotted part; a pattern whose last segment is q_a_proj / q_b_proj / kv_a_proj_with_mqa / kv_b_proj
     excludes that projection in EVERY layer (substring of the prefix's last segment)
  C3 srt/layers/quantization/utils.py:48-125  is_layer_skipped: fused prefix -> its shards, all alike or ValueError
  C4 modelopt_quant.py:532-610  FP8 linear: weight E4M3 [out, in], weight_scale / input_scale one per shard
  C5 modelopt_quant.py:1097-1200  FP8 MoE: per-expert scalar scales, w13 max over w1/w3, input scales max
  C6 srt/models/deepseek_common/deepseek_weight_loader.py:438-513  q_a_proj / kv_a_proj_with_mqa tensors of every
     suffix concatenated on dim 0, scalars: q_a_proj's alone (fused_weight = q_a_proj_weight)
  C7 deepseek_weight_loader.py:514-523  modelopt self_attn.k_proj.k_scale -> self_attn.attn_mqa.k_scale (the MLA
     latent cache); srt/layers/attention/trtllm_mla_backend.py:955-974 multiplies decode logits by it while
     sglang/kernels/ops/attention/utils.py:115-117 writes the latent cache unscaled; srt/mem_cache/
     kv_cache_dtype.py:49-56 makes kv_cache_quant_algo FP8 an FP8 cache by default
  C8 srt/models/mixtral.py:425-435  k_proj.k_scale -> qkv_proj.k_scale -> params_dict KeyError
  C9 srt/models/qwen3_moe.py:1208-1226  k_proj.k_scale -> qkv_proj.k_scale, not a parameter: skipped
  C10 deepseek_weight_loader.py:639-762  kv_b_proj split into w_kc / w_vc: FP8 (block or per tensor) is
     dequantized, any other stored dtype (NVFP4 uint8) is split as it is; forward_mla.py:586 torch.bmm on it
  C11 modelopt_quant.py:1826-1888  NVFP4 linear: weight U8 [out, in/2], weight_scale E4M3 [out, in/16],
     weight_scale_2 / input_scale one per shard, .max() over shards
  C12 modelopt_quant.py:2747-2756  NVFP4 MoE: w1 / w3 weight_scale_2 must match (w1's used)
  C13 srt/layers/quantization/fp8.py:340-430  quant_method fp8: modules_to_not_convert, weight_block_size,
     weight_scale_inv [ceil(out/128), ceil(in/128)]; fused parts other than the last whole 128-row blocks
  C14 model_config.py:1855-1865  quant_algo MIXED_PRECISION -> modelopt_mixed when any quantized_layers entry is
     NVFP4 / W4A16_NVFP4, else w4afp8 (config.json's quantization_config is updated in place, 1727-1741)
  C15 modelopt_quant.py:978-1008  ModelOptMixedPrecisionConfig._resolve_quant_algo: the prefix itself, else its
     shards through the model class's packed_modules_mapping (qwen3_moe.py:999-1002 qkv_proj / gate_up_proj;
     deepseek_v2.py:3250-3275 fused_qkv_a_proj_with_mqa only; mixtral.py none: model_loader/loader.py:180 {}),
     else the first quantized_layers key under "prefix."; none found -> None
  C16 modelopt_quant.py:1048-1063  mixed linear: excluded or algo outside FP8 / FP8_PB_WO / MXFP8 / NVFP4 /
     W4A16_NVFP4 (W4A16_AWQ, W4A8_AWQ, FP8_PER_CHANNEL_PER_TOKEN, None) -> UnquantizedLinearMethod (a bf16
     weight of the checkpoint's shape: packed 4-bit fails its size check, FP8 is cast without its scale; the
     scales have no parameter: mixtral.py:435 KeyError, qwen3_moe.py / deepseek_weight_loader.py:528 skip them)
  C17 modelopt_quant.py:1079-1091, fused_moe_triton/layer.py:499-505  mixed FusedMoE: FP8 / NVFP4 / W4A16_NVFP4 /
     block FP8 / MXFP8, anything else (W4A8_AWQ) -> UnquantizedFusedMoEMethod (bf16 [E, 2I, H])
  C18 w4afp8.py:78-104  W4AFp8Config: no ignored layers, every LinearBase Fp8LinearMethod(block [128, 128],
     weight_scale_inv); w4afp8.py:133-195 W4AFp8MoEMethod: int8 w13 [E, 2I, H/2], w13_weight_scale_inv f32
     [E, 2I, H/128] (zeros until loaded), so Model-Optimizer's weight_scale is never read
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

from safetensors import safe_open

FUSED_MLA = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"}
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"],
          "fused_qkv_a_proj_with_mqa": ["q_a_proj", "kv_a_proj_with_mqa"]}


def load(d: Path):
    idx = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.is_file() else ["model.safetensors"]
    meta = {}
    for f in files:
        with safe_open(d / f, "pt") as s:
            for k in s.keys():
                sl = s.get_slice(k)
                meta[k] = (sl.get_dtype(), tuple(sl.get_shape()), d / f)
    return meta


def scalar(meta, k):
    with safe_open(meta[k][2], "pt") as s:
        return float(s.get_tensor(k).float().reshape(-1)[0])


def excluded_modelopt(prefix: str, patterns: list[str]) -> bool:  # C2
    for p in patterns:
        rx = re.compile(p.replace(".", r"\.").replace("*", r".*"))
        if rx.fullmatch(prefix) or any(rx.fullmatch(part) for part in prefix.split(".")):
            return True
        tail = p.rsplit(".", 1)[-1]
        if tail in FUSED_MLA and tail in prefix.rsplit(".", 1)[-1]:
            return True
    return False


def path_match(ignored: str, prefix: str) -> bool:  # C3 _module_path_match
    ignored, prefix = ignored.rstrip("."), prefix.rstrip(".")
    return ignored == prefix or prefix.startswith(ignored + ".") or ("." + ignored + ".") in ("." + prefix + ".")


def skipped(prefix: str, ignored: list[str], out: list) -> bool:  # C3
    proj = prefix.split(".")[-1]
    if proj in PACKED:
        flags = {any(path_match(i, prefix.replace(proj, s)) for i in ignored) for s in PACKED[proj]}
        if len(flags) > 1:
            out.append(("FAIL", f"{prefix}: some shards ignored, some not (utils.py:100 ValueError)"))
        return flags.pop()
    hit = any(path_match(i, prefix) for i in ignored)
    if "experts" in prefix:
        hit = hit or any(prefix in n for n in ignored if "experts" in n)
    return hit


def family_layout(cfg):
    mt = cfg["model_type"]
    if mt in ("deepseek_v3", "kimi_k2", "deepseek_v2"):
        n_exp = cfg["n_routed_experts"]
        return "deepseek", n_exp, ("gate_proj", "up_proj", "down_proj"), "mlp"
    if mt == "qwen3_moe":
        n_exp = cfg.get("num_experts", cfg.get("num_local_experts"))  # transformers 5: attribute_map
        return "qwen3_moe", n_exp, ("gate_proj", "up_proj", "down_proj"), "mlp"
    if mt == "mixtral":
        return "mixtral", cfg["num_local_experts"], ("w1", "w3", "w2"), "block_sparse_moe"
    raise SystemExit(f"unknown model_type {mt}")


def linears(cfg, fam, i):
    """SGLang's quantizable LinearBase modules of layer i: (prefix, [checkpoint shard prefixes])."""
    a = f"model.layers.{i}.self_attn"
    if fam == "deepseek":
        out = [(f"{a}.o_proj", [f"{a}.o_proj"]), (f"{a}.kv_b_proj", [f"{a}.kv_b_proj"])]
        if cfg.get("q_lora_rank"):
            out += [(f"{a}.fused_qkv_a_proj_with_mqa", [f"{a}.q_a_proj", f"{a}.kv_a_proj_with_mqa"]),
                    (f"{a}.q_b_proj", [f"{a}.q_b_proj"])]
        dense = i < cfg.get("first_k_dense_replace", 0) or (i % cfg.get("moe_layer_freq", 1)) != 0
        m = f"model.layers.{i}.mlp" + ("" if dense else ".shared_experts")
        if dense or cfg.get("n_shared_experts"):
            out += [(f"{m}.gate_up_proj", [f"{m}.gate_proj", f"{m}.up_proj"]), (f"{m}.down_proj", [f"{m}.down_proj"])]
        return out, not dense
    out = [(f"{a}.qkv_proj", [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"]), (f"{a}.o_proj", [f"{a}.o_proj"])]
    return out, True


def stored_kind(meta, p):
    dt = meta.get(p + ".weight", (None,))[0]
    return {"F8_E4M3": "fp8", "U8": "fp4"}.get(dt, "bf16" if dt in ("BF16", "F16", "F32") else dt)


# C15: the fused linears ModelOptMixedPrecisionConfig resolves through the model class's packed_modules_mapping
MIXED_PACKED = {"deepseek": {"fused_qkv_a_proj_with_mqa": ["q_a_proj", "kv_a_proj_with_mqa"]},
                "qwen3_moe": {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]},
                "mixtral": {}}
# C16 / C17: quant_algo -> method (absent: unquantized); modelopt_fp4 with W4A16_NVFP4 reads no input_scale
MIXED_LINEAR = {"FP8": "modelopt_fp8", "NVFP4": "modelopt_fp4", "W4A16_NVFP4": "modelopt_fp4",
                "FP8_PB_WO": "fp8", "FP8_BLOCK_SCALES": "fp8"}
MIXED_MOE = MIXED_LINEAR
WANT = {"modelopt_fp8": "fp8", "modelopt_fp4": "fp4", "fp8": "fp8", "w4afp8": "fp4", None: "bf16"}


def resolve(prefix: str, layers: dict, packed: dict):  # C15
    if prefix in layers:
        return layers[prefix]["quant_algo"].upper()
    base, proj = prefix.rsplit(".", 1)
    algos = {layers[f"{base}.{s}"]["quant_algo"].upper() for s in packed.get(proj, []) if f"{base}.{s}" in layers}
    if len(algos) > 1:
        raise ValueError(f"{prefix}: mixed quant_algo within fused layer {algos} (modelopt_quant.py:996 ValueError)")
    if algos:
        return algos.pop()
    return next((v["quant_algo"].upper() for k, v in layers.items() if k.startswith(prefix + ".")), None)


def quant_route(d: Path, cfg, qc, fam, out):
    """(method name, route(prefix, moe) -> (method or None for unquantized, w4a16)) or a FAIL list."""
    qm = qc.get("quant_method")
    if qm in (None, "modelopt"):  # C1
        algo = qc.get("quant_algo")
        ex = qc.get("ignore") or []
        is_ex = lambda p: skipped(p, ex, out) or excluded_modelopt(p, ex)  # noqa: E731  C2 + C3
        if algo == "MIXED_PRECISION":
            return mixed_route(d, cfg, qc, fam, is_ex, out)
        method = "modelopt_fp8" if algo == "FP8" else "modelopt_fp4" if algo and "FP4" in algo else None
        if method is None:
            return [("FAIL", f"quant_algo {algo!r}: not one SGLang's ModelOpt parser maps (model_config.py:1853)")]
        return method, lambda p, moe: (None if is_ex(p) else method, algo == "W4A16_NVFP4")
    if qm == "fp8":
        ignored = qc.get("modules_to_not_convert") or qc.get("ignored_layers") or []
        ignored = [v for n in ignored for v in (n.removeprefix("model."), "model." + n.removeprefix("model."))]
        bs = qc.get("weight_block_size")
        if bs != [128, 128]:
            out.append(("FAIL", f"weight_block_size {bs}"))
        return "fp8", lambda p, moe: (None if skipped(p, ignored, out) else "fp8", False)
    return [("FAIL", f"quant_method {qm!r} not checked here")]


def mixed_route(d: Path, cfg, qc, fam, is_ex, out):
    hq = d / "hf_quant_config.json"
    layers = qc.get("quantized_layers") or \
        (json.loads(hq.read_text())["quantization"].get("quantized_layers") if hq.is_file() else None) or {}
    if not any(v.get("quant_algo", "").upper() in ("NVFP4", "W4A16_NVFP4") for v in layers.values()):  # C14
        return "w4afp8", lambda p, moe: ("w4afp8" if moe else "fp8", False)  # C18: nothing excluded
    packed = dict(MIXED_PACKED[fam])
    if fam == "deepseek" and not cfg.get("q_lora_rank"):
        packed.pop("fused_qkv_a_proj_with_mqa")

    def route(p, moe):
        if is_ex(p):
            return None, False
        try:
            algo = resolve(p, layers, packed)
        except ValueError as e:
            out.append(("FAIL", str(e)))
            return None, False
        return (MIXED_MOE if moe else MIXED_LINEAR).get(algo), algo == "W4A16_NVFP4"
    return "modelopt_mixed", route


def check(d: Path) -> list:
    cfg = json.loads((d / "config.json").read_text())
    qc = cfg.get("quantization_config") or {}
    meta = load(d)
    out = []
    fam, n_exp, (g, u, dn), mlp = family_layout(cfg)
    got = quant_route(d, cfg, qc, fam, out)
    if isinstance(got, list):
        return got
    name, route = got
    for i in range(cfg["num_hidden_layers"]):
        lins, moe = linears(cfg, fam, i)
        for prefix, parts in lins:
            method, w4a16 = route(prefix, False)
            kinds = {stored_kind(meta, p) for p in parts}
            if len(kinds) > 1:
                out.append(("FAIL", f"{prefix}: parts stored {kinds}"))
                continue
            kind = kinds.pop()
            if method is None and kind != "bf16":  # C16: a packed 4-bit weight fails the bf16 size check
                out.append(("FAIL" if kind == "fp4" else "WRONG",
                            f"{prefix}: SGLang ({name}) keeps it unquantized but it is stored {kind}"))
            elif method is not None and kind != WANT[method]:
                out.append(("FAIL" if kind in ("bf16", "fp4") else "WRONG",
                            f"{prefix}: SGLang quantizes it ({name}: {method}) but it is stored {kind}"))
            elif method is not None:
                out += check_linear(meta, method, prefix, parts, w4a16)
            if prefix.endswith("kv_b_proj") and kind == "fp4":  # C10
                out.append(("FAIL", f"{prefix}: packed 4-bit kv_b_proj: post_load_weights splits the U8 weight "
                                    "into w_kc / w_vc undequantized (deepseek_weight_loader.py:639-762), "
                                    "forward_mla.py:586 bmm"))
        if moe:
            pre = f"model.layers.{i}.{mlp}.experts"
            method, w4a16 = route(pre, True)
            out += check_moe(meta, name, method, pre, n_exp, (g, u, dn), w4a16)
    out += check_kv(meta, fam)
    return out


def check_linear(meta, method, prefix, parts, w4a16):
    out = []
    for p in parts:
        _, shape, _ = meta[p + ".weight"]
        if method == "modelopt_fp8":  # C4
            for s in ("weight_scale", "input_scale"):
                m = meta.get(f"{p}.{s}")
                if m is None or math.prod(m[1]) != 1 or m[0] != "F32":
                    out.append(("FAIL", f"{p}.{s}: {m and m[:2]} (expected one F32)"))
        elif method == "modelopt_fp4":  # C11
            o, i2 = shape
            ws = meta.get(p + ".weight_scale")
            if ws is None or ws[0] != "F8_E4M3" or ws[1] != (o, i2 * 2 // 16):
                out.append(("FAIL", f"{p}.weight_scale: {ws and ws[:2]} (expected E4M3 {(o, i2 * 2 // 16)})"))
            for s in ("weight_scale_2",) + (() if w4a16 else ("input_scale",)):
                m = meta.get(f"{p}.{s}")
                if m is None or math.prod(m[1]) != 1:
                    out.append(("FAIL", f"{p}.{s}: {m and m[:2]}"))
        else:  # C13
            o, i = shape
            si = meta.get(p + ".weight_scale_inv")
            if si is None or si[1] != (math.ceil(o / 128), math.ceil(i / 128)):
                want_si = (math.ceil(o / 128), math.ceil(i / 128))
                out.append(("FAIL", f"{p}.weight_scale_inv: {si and si[:2]} (expected {want_si})"))
            if i % 128:
                out.append(("FAIL", f"{p}: in_features {i} not whole 128-groups (per-token-group activation quant)"))
    if len(parts) > 1:
        if method == "fp8":
            for p in parts[:-1]:
                if meta[p + ".weight"][1][0] % 128:
                    out.append(("FAIL", f"{p}: fused part of {meta[p + '.weight'][1][0]} rows, not whole 128-blocks"))
        else:
            mla = prefix.endswith("fused_qkv_a_proj_with_mqa")  # C6: scalars are q_a_proj's alone
            names = ["weight_scale", "input_scale"] if method == "modelopt_fp8" else \
                ["weight_scale_2"] + (["input_scale"] if mla else [])
            if method == "modelopt_fp8" and not mla:
                names = []  # per-shard scales, requantized to the max (C4): exact
            for s in names:
                vals = {scalar(meta, f"{p}.{s}") for p in parts if f"{p}.{s}" in meta}
                if len(vals) > 1:
                    out.append(("WRONG", f"{prefix}: parts' {s} differ {sorted(vals)}; SGLang uses "
                                         f"{'the first part' if mla else 'the max'} for all"))
    return out


def check_moe(meta, name, method, pre, n_exp, names, w4a16):
    out = []
    kinds = {stored_kind(meta, f"{pre}.{e}.{n}") for e in range(n_exp) for n in names}
    if method is None and kinds != {"bf16"}:
        out.append(("WRONG" if kinds == {"fp8"} else "FAIL", f"{pre}: SGLang ({name}) runs them unquantized "
                                                             f"(bf16 [E, 2I, H]) but they are stored {kinds}"))
        return out
    if method is None:
        return out
    if kinds != {WANT[method]}:
        out.append(("FAIL", f"{pre}: experts stored {kinds}, SGLang {name} ({method}) expects {WANT[method]}"))
        return out
    if f"{pre}.{n_exp}.{names[0]}.weight" in meta:
        out.append(("FAIL", f"{pre}: more experts than the config's {n_exp}"))
    for e in range(n_exp):
        for n in names:
            p = f"{pre}.{e}.{n}"
            if method == "w4afp8":  # C18: read as weight_scale_inv [out, in/128] f32, else zeros
                si, (o, i2) = meta.get(p + ".weight_scale_inv"), meta[p + ".weight"][1]
                if si is None or si[1] != (o, i2 * 2 // 128):
                    out.append(("WRONG", f"{p}.weight_scale_inv: {si and si[:2]}: W4AFp8MoEMethod's "
                                         f"w13/w2_weight_scale_inv stay zeros (w4afp8.py:174-195); "
                                         f"Model-Optimizer's weight_scale is never read"))
            sc = {"modelopt_fp8": ["weight_scale", "input_scale"],
                  "modelopt_fp4": ["weight_scale_2"] + ([] if w4a16 else ["input_scale"])}.get(method, [])
            for s in sc:
                if f"{p}.{s}" not in meta or math.prod(meta[f"{p}.{s}"][1]) != 1:
                    out.append(("FAIL", f"{p}.{s} missing or not a scalar"))
            if method == "fp8" and meta[p + ".weight"][1][0] % 128:
                out.append(("FAIL", f"{p}: {meta[p + '.weight'][1][0]} rows not divisible by block_n 128"))
        if method == "modelopt_fp4":  # C12
            a, b = (scalar(meta, f"{pre}.{e}.{n}.weight_scale_2") for n in names[:2])
            if a != b:
                out.append(("WRONG", f"{pre}.{e}: w1 / w3 weight_scale_2 differ ({a} vs {b}); SGLang uses w1's"))
    return out


def check_kv(meta, fam):
    ks = [k for k in meta if k.endswith((".k_scale", ".v_scale"))]
    if not ks:
        return []
    if fam == "deepseek":  # C7
        bad = [k for k in ks if scalar(meta, k) != 1.0]
        return [("WRONG", f"{len(bad)} MLA k/v scales != 1 (e.g. {bad[0]}={scalar(meta, bad[0]):.4g}) are read as "
                          "self_attn.attn_mqa's latent-cache scale")] if bad else []
    if fam == "mixtral":  # C8
        return [("FAIL", f"{ks[0]}: mixtral.py load_weights maps it to qkv_proj.{ks[0].rsplit('.', 1)[1]}: KeyError")]
    return [("NOTE", f"{len(ks)} k/v scales skipped by qwen3_moe.py load_weights: FP8 cache at scale 1.0")]


def main(argv):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exports", nargs="+", metavar="EXPORT_DIR", help="hf-modelopt or hf-fp8-block export directories")
    bad = 0
    for a in ap.parse_args(argv).exports:
        if not (Path(a) / "config.json").is_file():
            ap.error(f"{a}: not a checkpoint directory (no config.json)")
        res = check(Path(a))
        bad += sum(1 for lvl, _ in res if lvl in ("FAIL", "WRONG"))
        print(f"{a}: {'ok' if not res else ''}")
        seen = set()
        for lvl, msg in res:
            key = (lvl, re.sub(r"\d+", "N", msg))
            if key not in seen:
                seen.add(key)
                print(f"  {lvl} {msg}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
