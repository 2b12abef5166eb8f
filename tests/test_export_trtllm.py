"""trtllm-ckpt: config fields, tensor names/shapes/dtypes against TensorRT-LLM's documented layout,
and the shards dequantized back equal the source weights.

Expected layout, written from NVIDIA/TensorRT-LLM (not from our exporter):
docs/source/architecture/checkpoint.md (config.json keys, rank{N}.safetensors, transformer.* names),
tensorrt_llm/layers/moe.py (router [E, H] float32 unsplit; fc [E/ep, 2*I/moe_tp, H] = w3 then w1;
proj [E/ep, H, I/moe_tp]; FP8 weights_scaling_factor [E/ep, 1], activation_scaling_factor [1]),
tensorrt_llm/mapping.py (moe_tp_rank = tp_rank // moe_ep_size, moe_ep_rank = tp_rank % moe_ep_size).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import make_random_checkpoint
from moepress import models
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.quantize import QuantConfig, quantize_checkpoint

QWEN, MIXTRAL = models.path("tiny-qwen3-moe"), models.path("tiny-mixtral")


def load_rank(out: Path, r: int) -> dict[str, torch.Tensor]:
    with safe_open(str(out / f"rank{r}.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def expected_layout(cfg: dict, tp: int, ep: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """rank-local names -> (shape, dtype) as TensorRT-LLM documents them."""
    H, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or H // nh
    E = cfg.get("num_local_experts") or cfg["num_experts"]
    inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    bf = torch.bfloat16
    out = {"transformer.vocab_embedding.weight": ((V, H), bf), "transformer.ln_f.weight": ((H,), bf),
           "lm_head.weight": ((V // tp, H), bf)}
    for i in range(L):
        p = f"transformer.layers.{i}."
        out.update({
            p + "attention.qkv.weight": (((nh + 2 * nkv) * hd // tp, H), bf),
            p + "attention.dense.weight": ((H, nh * hd // tp), bf),
            p + "input_layernorm.weight": ((H,), bf),
            p + "post_layernorm.weight": ((H,), bf),
            p + "mlp.router.weight": ((E, H), torch.float32),
            p + "mlp.fc.weight": ((E // ep, 2 * inter // (tp // ep), H), bf),
            p + "mlp.proj.weight": ((E // ep, H, inter // (tp // ep)), bf),
        })
        if cfg["model_type"] == "qwen3_moe":
            out[p + "attention.q_layernorm.weight"] = ((hd,), bf)
            out[p + "attention.k_layernorm.weight"] = ((hd,), bf)
    return out


def _copy_as(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    """``src`` with its float tensors (and config dtype) in ``dtype``."""
    from moepress.compress.checkpoint import CheckpointWriter

    r = CheckpointReader(src)
    with CheckpointWriter(dst) as w:
        for n in r.names():
            t = r.get(n)
            w.add(n, t.to(dtype) if t.is_floating_point() else t)
        w.write_json("config.json", {**r.config, "dtype": str(dtype).removeprefix("torch.")})
    return dst


def _bf16_copy(src: Path, dst: Path) -> Path:
    """``src`` with its float tensors in bf16 (the exporter writes bf16: equal bits to compare)."""
    return _copy_as(src, dst, torch.bfloat16)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from moepress.exporters import ExportConfig, export

    root = tmp_path_factory.mktemp("trtllm")
    outs = {}
    for key, src, tp, ep in (("qwen_tp1", QWEN, 1, 1), ("mixtral_tp2_ep2", MIXTRAL, 2, 2),
                             ("qwen_tp2_ep1", QWEN, 2, 1)):
        export(src, root / key, ExportConfig(format="trtllm-ckpt", tp=tp, ep=ep))
        outs[key] = root / key
    # tp 4 with ep 2 (moe_tp 2): the one mapping where a rank's moe_tp and moe_ep indices differ in order
    # (mapping.py: moe_tp_rank = tp_rank // moe_ep_size); the bundled models have 2 KV heads, so a random one
    rand = _bf16_copy(make_random_checkpoint("mixtral", root / "rand", num_key_value_heads=4), root / "rand16")
    export(rand, root / "mixtral_tp4_ep2", ExportConfig(format="trtllm-ckpt", tp=4, ep=2))
    outs["mixtral_tp4_ep2"], outs["rand_src"] = root / "mixtral_tp4_ep2", rand
    q = root / "mixtral-fp8"
    quantize_checkpoint(MIXTRAL, q, QuantConfig(format="fp8", kv_cache="fp8", num_samples=4, seq_len=64))
    export(q, root / "fp8_tp2_ep2", ExportConfig(format="trtllm-ckpt", tp=2, ep=2))
    outs["fp8_tp2_ep2"], outs["fp8_src"] = root / "fp8_tp2_ep2", q
    return outs


@pytest.mark.parametrize("key,src,tp,ep,arch", [("qwen_tp1", QWEN, 1, 1, "Qwen3MoeForCausalLM"),
                                                ("mixtral_tp2_ep2", MIXTRAL, 2, 2, "MixtralForCausalLM"),
                                                ("qwen_tp2_ep1", QWEN, 2, 1, "Qwen3MoeForCausalLM")])
def test_config_and_layout(exports, key, src, tp, ep, arch):
    out = exports[key]
    hf = json.loads((src / "config.json").read_text())
    c = json.loads((out / "config.json").read_text())
    assert c["architecture"] == arch and c["dtype"] == "bfloat16"
    for k_trt, k_hf in (("num_hidden_layers", "num_hidden_layers"), ("hidden_size", "hidden_size"),
                        ("num_attention_heads", "num_attention_heads"), ("vocab_size", "vocab_size"),
                        ("num_key_value_heads", "num_key_value_heads"), ("head_size", "head_dim"),
                        ("norm_epsilon", "rms_norm_eps"), ("max_position_embeddings", "max_position_embeddings"),
                        ("intermediate_size", "intermediate_size")):
        assert c[k_trt] == hf[k_hf], k_trt
    assert c["position_embedding_type"] == "rope_gpt_neox"
    assert c["rotary_base"] == hf["rope_parameters"]["rope_theta"]
    assert c["mapping"] == {"world_size": tp, "tp_size": tp, "pp_size": 1, "moe_tp_size": tp // ep, "moe_ep_size": ep}
    assert c["quantization"]["quant_algo"] is None and c["quantization"]["kv_cache_quant_algo"] is None
    E = hf.get("num_local_experts") or hf.get("num_experts")
    assert c["moe"]["num_experts"] == E and c["moe"]["top_k"] == hf["num_experts_per_tok"]
    assert c["moe"]["normalization_mode"] == 1  # RENORMALIZE: both models renormalise the top-k weights
    if arch.startswith("Qwen3"):
        assert c["qwen_type"] == "qwen3_moe" and c["moe_intermediate_size"] == hf["moe_intermediate_size"]
    want = expected_layout(hf, tp, ep)
    for r in range(tp):
        got = load_rank(out, r)
        assert set(got) == set(want)
        for name, (shape, dtype) in want.items():
            assert tuple(got[name].shape) == shape and got[name].dtype == dtype, name


@pytest.mark.parametrize("key,src,tp,ep", [("qwen_tp1", QWEN, 1, 1), ("mixtral_tp2_ep2", MIXTRAL, 2, 2),
                                           ("qwen_tp2_ep1", QWEN, 2, 1), ("mixtral_tp4_ep2", None, 4, 2)])
def test_shards_reassemble_bf16_exactly(exports, key, src, tp, ep):
    """Undo the documented split (fc = [w3; w1], experts by ep, heads by tp) and compare bit for bit."""
    reader = CheckpointReader(src or exports["rand_src"])
    hf = reader.config
    ranks = [load_rank(exports[key], r) for r in range(tp)]
    nh, nkv = hf["num_attention_heads"], hf["num_key_value_heads"]
    hd = hf.get("head_dim") or hf["hidden_size"] // nh
    E = hf.get("num_local_experts") or hf.get("num_experts")
    mixtral = hf["model_type"] == "mixtral"
    ffn, (g, u, d) = (("block_sparse_moe", ("w1", "w3", "w2")) if mixtral
                      else ("mlp", ("gate_proj", "up_proj", "down_proj")))
    moe_tp = tp // ep
    assert torch.equal(ranks[0]["transformer.vocab_embedding.weight"], reader.get("model.embed_tokens.weight"))
    assert torch.equal(torch.cat([r["lm_head.weight"] for r in ranks]), reader.get("lm_head.weight"))
    for r in ranks:
        assert torch.equal(r["transformer.ln_f.weight"], reader.get("model.norm.weight"))
    for i in range(hf["num_hidden_layers"]):
        p, t = f"model.layers.{i}.", f"transformer.layers.{i}."
        qs, ks, vs = [], [], []
        for r in ranks:
            q, k, v = r[t + "attention.qkv.weight"].split([nh * hd // tp, nkv * hd // tp, nkv * hd // tp])
            qs.append(q)
            ks.append(k)
            vs.append(v)
        for parts, n in ((qs, "q"), (ks, "k"), (vs, "v")):
            assert torch.equal(torch.cat(parts), reader.get(p + f"self_attn.{n}_proj.weight"))
        assert torch.equal(torch.cat([r[t + "attention.dense.weight"] for r in ranks], 1),
                           reader.get(p + "self_attn.o_proj.weight"))
        assert torch.equal(ranks[-1][t + "mlp.router.weight"], reader.get(p + f"{ffn}.gate.weight").float())
        norms = {"input_layernorm": "input_layernorm", "post_layernorm": "post_attention_layernorm"}
        if not mixtral:
            norms |= {"attention.q_layernorm": "self_attn.q_norm", "attention.k_layernorm": "self_attn.k_norm"}
        for trt, hf_name in norms.items():
            for r in ranks:
                assert torch.equal(r[t + trt + ".weight"], reader.get(p + hf_name + ".weight")), trt
        for e in range(E):
            mep = e // (E // ep)
            slot = e % (E // ep)
            ups, gates, downs = [], [], []
            for mtp in range(moe_tp):
                r = ranks[mtp * ep + mep]  # tp_rank with moe_tp_rank = mtp, moe_ep_rank = mep
                fc = r[t + "mlp.fc.weight"][slot]
                half = fc.shape[0] // 2
                ups.append(fc[:half])  # w3 (up) first
                gates.append(fc[half:])
                downs.append(r[t + "mlp.proj.weight"][slot])
            ep_ = f"{p}{ffn}.experts.{e}."
            assert torch.equal(torch.cat(ups), reader.get(ep_ + f"{u}.weight"))
            assert torch.equal(torch.cat(gates), reader.get(ep_ + f"{g}.weight"))
            assert torch.equal(torch.cat(downs, 1), reader.get(ep_ + f"{d}.weight"))


def test_fp8_activation_and_kv_cache_scales_are_the_sources(exports):
    """Static FP8 scales, from the quantized checkpoint's own tensors: a fused GEMM's
    activation_scaling_factor is the largest of its members' input_scale (qkv: q, k, v; a rank's
    fc: its experts' w1 and w3; proj: their w2), so no member's inputs clip; the KV cache's is
    max(k_scale, v_scale) (one scale for the cache), with kv_cache_quant_algo FP8."""
    out, src = exports["fp8_tp2_ep2"], exports["fp8_src"]
    assert json.loads((out / "config.json").read_text())["quantization"]["kv_cache_quant_algo"] == "FP8"
    reader = CheckpointReader(src)
    E, ep = 8, 2

    def scale(name):
        return float(reader.get(name))

    for i in range(reader.config["num_hidden_layers"]):
        t, a = f"transformer.layers.{i}.", f"model.layers.{i}.self_attn."
        x = f"model.layers.{i}.block_sparse_moe.experts."
        for rk in range(2):
            r = load_rank(out, rk)
            mine = range(rk % ep * (E // ep), (rk % ep + 1) * (E // ep))
            want = {"attention.qkv": max(scale(a + f"{n}_proj.input_scale") for n in "qkv"),
                    "attention.dense": scale(a + "o_proj.input_scale"),
                    "mlp.fc": max(scale(x + f"{e}.{n}.input_scale") for e in mine for n in ("w1", "w3")),
                    "mlp.proj": max(scale(x + f"{e}.w2.input_scale") for e in mine)}
            for mod, v in want.items():
                got = r[t + mod + ".activation_scaling_factor"]
                assert got.shape == (1,) and got.dtype == torch.float32 and float(got) == v, (i, rk, mod)
            kv = r[t + "attention.kv_cache_scaling_factor"]
            assert kv.shape == (1,) and float(kv) == max(scale(a + "k_scale"), scale(a + "v_scale")) > 0


def _rewrite(src: Path, edits) -> None:
    """Apply ``edits(tensors)`` to the shards of a copied checkpoint, in place."""
    from safetensors.torch import load_file, save_file

    for shard in sorted(src.glob("*.safetensors")):
        t = load_file(shard)
        if edits(t):
            save_file(t, shard, metadata={"format": "pt"})


def test_foreign_fp8_scales_fuse_at_the_largest(exports, tmp_path):
    """An FP8 checkpoint whose fused members do not share scales (another producer's): q/k/v and an expert's
    w1/w3 are re-rounded to the largest weight scale (TensorRT-LLM dequantizes fp8 * weights_scaling_factor),
    the activation scale is the largest input_scale, the KV cache's max(k_scale, v_scale) (Model-Optimizer
    0.47 model_config_utils.py: one scale for both). moepress's own quantize shares them, so none of this ran."""
    from moepress.exporters import ExportConfig, export

    src = shutil.copytree(exports["fp8_src"], tmp_path / "foreign")
    a, x = "model.layers.0.self_attn.", "model.layers.0.block_sparse_moe.experts.0."
    y = "model.layers.0.block_sparse_moe.experts.5."
    fp8 = torch.float8_e4m3fn

    def edit(t):
        hit = False
        for n in (a + "k_proj", x + "w1"):  # the same values at twice the scale
            if n + ".weight" in t:
                t[n + ".weight"] = (t[n + ".weight"].float() / 2).to(fp8)
                t[n + ".weight_scale"] = t[n + ".weight_scale"] * 2
                hit = True
        if x + "w1.input_scale" in t:
            t[x + "w1.input_scale"] = t[x + "w1.input_scale"] * 3
        if y + "w3.input_scale" in t:  # the largest, on an expert that is not the rank's first
            t[y + "w3.input_scale"] = t[y + "w3.input_scale"] * 5
            hit = True
        if a + "v_scale" in t:
            t[a + "v_scale"] = torch.maximum(t[a + "k_scale"], t[a + "v_scale"]) * 4
            hit = True
        return hit

    _rewrite(src, edit)
    out = tmp_path / "ckpt"
    export(src, out, ExportConfig(format="trtllm-ckpt"))
    r, reader = load_rank(out, 0), CheckpointReader(src)
    t = "transformer.layers.0."
    s_qkv = r[t + "attention.qkv.weights_scaling_factor"]
    assert float(s_qkv) == max(float(reader.get(a + f"{n}_proj.weight_scale")) for n in "qkv")
    rows = [reader.get(a + f"{n}_proj.weight").shape[0] for n in "qkv"]
    for part, n in zip(r[t + "attention.qkv.weight"].float().split(rows), "qkv", strict=True):
        want = reader.get(a + f"{n}_proj.weight").float() * reader.get(a + f"{n}_proj.weight_scale")
        got = part * s_qkv  # within half an FP8 step at the shared scale
        assert ((got - want).abs() <= want.abs() * 2.0 ** -4 + float(s_qkv) * 2.0 ** -9).all(), n
    fc, s_fc = r[t + "mlp.fc.weight"][0].float(), r[t + "mlp.fc.weights_scaling_factor"][0]
    half = fc.shape[0] // 2
    for part, n in ((fc[:half], "w3"), (fc[half:], "w1")):
        want = reader.get(x + f"{n}.weight").float() * reader.get(x + f"{n}.weight_scale")
        assert ((part * s_fc - want).abs() <= want.abs() * 2.0 ** -4 + float(s_fc) * 2.0 ** -9).all(), n
    assert float(r[t + "mlp.fc.activation_scaling_factor"]) == max(
        float(reader.get(f"model.layers.0.block_sparse_moe.experts.{e}.{n}.input_scale"))
        for e in range(8) for n in ("w1", "w3")) == float(reader.get(y + "w3.input_scale"))
    assert float(r[t + "attention.kv_cache_scaling_factor"]) == float(reader.get(a + "v_scale")) > float(
        reader.get(a + "k_scale"))


@pytest.mark.parametrize("how", ["missing", "zero"])
def test_fp8_linears_without_a_static_input_scale_are_refused(exports, tmp_path, cli_run, how):
    """An FP8 per-tensor checkpoint whose expert w2 has no input_scale (another producer's weight-only FP8) or a zero
    one: TensorRT-LLM quantizes every FP8 input with activation_scaling_factor and divides by proj's
    (layers/moe.py forward_experts, fc2_quant = 1 / scale); the export wrote 0.0 there and exited 0."""
    src = shutil.copytree(exports["fp8_src"], tmp_path / "noin")
    gone = "model.layers.1.block_sparse_moe.experts.3.w2.input_scale"

    def edit(t):
        if gone not in t:
            return False
        if how == "missing":
            del t[gone]
        else:
            t[gone] = torch.zeros_like(t[gone])
        return True

    _rewrite(src, edit)
    index = src / "model.safetensors.index.json"
    if how == "missing" and index.exists():
        m = json.loads(index.read_text())
        del m["weight_map"][gone]
        index.write_text(json.dumps(m))
    r = cli_run("export", src, "--format", "trtllm-ckpt", "-o", tmp_path / "t", "--quiet")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "1 FP8 linears without a static input_scale > 0 (model.layers.*.block_sparse_moe.experts.*.w2)" \
        in r.stderr, r.stderr
    assert not (tmp_path / "t").exists()


def test_fp8_excludes_the_routers_and_only_them(exports):
    """TensorRT-LLM's quantize_layers takes exclude_modules as given (fnmatch patterns; an explicit list replaces
    its defaults '*lm_head', '*router', ...): the float32 routers must match one, the FP8 linears none."""
    import fnmatch

    cfg = json.loads((exports["fp8_tp2_ep2"] / "config.json").read_text())
    ex = cfg["quantization"]["exclude_modules"]
    assert any(fnmatch.fnmatchcase("lm_head", e) for e in ex)
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.layers.{i}."
        assert any(fnmatch.fnmatchcase(p + "mlp.router", e) for e in ex), ex
        for m in ("attention.qkv", "attention.dense", "mlp.fc", "mlp.proj"):
            assert not any(fnmatch.fnmatchcase(p + m, e) for e in ex), (m, ex)


@pytest.mark.parametrize("norm", [False, True])
def test_normalization_mode_follows_norm_topk_prob(tmp_path, norm):
    """MoeConfig.ExpertScaleNormalizationMode: RENORMALIZE (1) only where the top-k weights are renormalised."""
    from helpers import make_random_checkpoint
    from moepress.exporters import ExportConfig, export

    src = make_random_checkpoint("qwen3_moe", tmp_path / "m", norm_topk_prob=norm)
    export(src, tmp_path / "o", ExportConfig(format="trtllm-ckpt"))
    assert json.loads((tmp_path / "o" / "config.json").read_text())["moe"]["normalization_mode"] == int(norm)


@pytest.mark.parametrize("tp", [2, 4])
def test_lm_head_rows_padded_to_a_multiple_of_tp(tmp_path, tp):
    """A vocabulary tp does not divide (255 over 2 or 4 ranks): each rank's lm_head has ceil(255 / tp) rows, the
    first 255 are the source's and the padding is zero (TensorRT-LLM _utils.pad_vocab_size). At tp 4 the padding is
    1 row, not 255 % 4 = 3 (at tp 2 they agree)."""
    from helpers import make_random_checkpoint
    from moepress.exporters import ExportConfig, export

    src = make_random_checkpoint("mixtral", tmp_path / "m", vocab_size=255)
    export(src, tmp_path / "o", ExportConfig(format="trtllm-ckpt", tp=tp, ep=1))
    heads = [load_rank(tmp_path / "o", r)["lm_head.weight"] for r in range(tp)]
    assert [h.shape[0] for h in heads] == [-(-255 // tp)] * tp
    full = torch.cat(heads)
    assert torch.equal(full[:255], CheckpointReader(src).get("lm_head.weight").bfloat16()) and not full[255:].any()


def test_fp8_scales_and_dequantized_weights(exports):
    """FP8: per-expert weights_scaling_factor [E/ep, 1], activation_scaling_factor [1]; fp8 * scale
    equals the quantized checkpoint's dequantized weight (exact for the member holding the fused
    max scale, within half an FP8 step of the shared scale for the re-rounded one)."""
    out, src = exports["fp8_tp2_ep2"], exports["fp8_src"]
    c = json.loads((out / "config.json").read_text())
    assert c["quantization"]["quant_algo"] == "FP8" and "lm_head" in c["quantization"]["exclude_modules"]
    reader = CheckpointReader(src)
    E, ep = 8, 2
    ranks = [load_rank(out, r) for r in range(2)]
    for i in range(reader.config["num_hidden_layers"]):
        t, p = f"transformer.layers.{i}.", f"model.layers.{i}.block_sparse_moe.experts."
        for rk, r in enumerate(ranks):
            fc, s = r[t + "mlp.fc.weight"], r[t + "mlp.fc.weights_scaling_factor"]
            assert fc.dtype == torch.float8_e4m3fn and s.shape == (E // ep, 1) and s.dtype == torch.float32
            assert r[t + "mlp.fc.activation_scaling_factor"].shape == (1,)
            assert r[t + "attention.qkv.weights_scaling_factor"].shape == (1,)
            for slot in range(E // ep):
                e = rk % ep * (E // ep) + slot
                got = fc[slot].float() * s[slot]
                half = got.shape[0] // 2
                for part, n in ((got[:half], "w3"), (got[half:], "w1")):
                    q, sc = reader.get(p + f"{e}.{n}.weight"), reader.get(p + f"{e}.{n}.weight_scale")
                    want = q.float() * sc
                    bound = want.abs() * 2.0 ** -4 + float(s[slot]) * 2.0 ** -9
                    assert ((part - want).abs() <= bound).all()
                    if float(sc) == float(s[slot]):
                        assert torch.equal(part, want)
                down = r[t + "mlp.proj.weight"][slot].float() * r[t + "mlp.proj.weights_scaling_factor"][slot]
                want = reader.get(p + f"{e}.w2.weight").float() * reader.get(p + f"{e}.w2.weight_scale")
                assert torch.equal(down, want)
            # the fused q/k/v of this rank (its share of the heads; an FP8 KV cache at tp 2 gave rank 1 all of K and V)
            qkv = r[t + "attention.qkv.weight"].float() * r[t + "attention.qkv.weights_scaling_factor"]
            a = f"model.layers.{i}.self_attn."
            want = torch.cat([(reader.get(a + f"{n}_proj.weight").float() * reader.get(a + f"{n}_proj.weight_scale"))
                              .chunk(2)[rk] for n in "qkv"])
            assert qkv.shape == want.shape, (i, rk, qkv.shape)
            bound = want.abs() * 2.0 ** -4 + float(r[t + "attention.qkv.weights_scaling_factor"]) * 2.0 ** -9
            assert ((qkv - want).abs() <= bound).all(), (i, rk)


@pytest.mark.parametrize("model,args,expect", [
    ("tiny-deepseek-v3", [], "PyTorch backend"),
    ("tiny-mixtral", ["--tp", "3", "--ep", "3"], "must divide the 8 experts"),
    ("tiny-qwen3-moe", ["--tp", "3", "--ep", "1"], "num_key_value_heads=2 or be a multiple of it"),
    ("tiny-mixtral", ["--tp", "2", "--ep", "4"], "must divide --tp 2"),
])
def test_bad_mapping_is_one_line_exit_2(cli_run, tmp_path, model, args, expect):
    r = cli_run("export", models.path(model), "--format", "trtllm-ckpt", "-o", tmp_path / "o", *args)
    assert r.exit_code == 2 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("tp,ep,refused", [(4, 1, True), (4, 2, False), (2, 1, False)])
def test_expert_width_that_moe_tp_cannot_split_is_refused(cli_run, tmp_path, tp, ep, refused):
    """TensorRT-LLM splits each expert's intermediate width over moe_tp = tp / ep ranks (fc rows, proj
    columns): an expert 98 wide splits over 2 ranks, not over 4."""
    src = make_random_checkpoint("mixtral", tmp_path / "m", num_key_value_heads=4, intermediate_size=98)
    r = cli_run("export", src, "--format", "trtllm-ckpt", "-o", tmp_path / "o", "--tp", str(tp), "--ep", str(ep))
    if refused:
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"moe_tp_size={tp // ep} must divide the expert intermediate size 98" in r.stderr
        assert not (tmp_path / "o").exists()
    else:
        assert r.exit_code == 0, r.output
        c = json.loads((tmp_path / "o" / "config.json").read_text())
        assert c["mapping"]["moe_tp_size"] == tp // ep


def test_int4_input_is_refused(cli_run, tmp_path):
    q = tmp_path / "q"
    quantize_checkpoint(MIXTRAL, q, QuantConfig(format="int4-awq", num_samples=4, seq_len=64))
    r = cli_run("export", q, "--format", "trtllm-ckpt", "-o", tmp_path / "o")
    # hf-modelopt refuses INT4 weight-only experts too: the hint names what takes this checkpoint
    assert r.exit_code == 2 and "quantize with --awq-fold, then export compressed-tensors" in r.stderr, r.stderr
    assert "hf-modelopt" not in r.stderr


@pytest.mark.parametrize("rule", ["self_attn.*=none", "block_sparse_moe.experts.1.*=none",
                                  "block_sparse_moe.experts.0.w1=none"])
def test_fp8_checkpoint_with_linears_left_bf16_is_refused(tmp_path, cli_run, rule):
    """quant_algo FP8 with an attention left bf16 wrote every weight of its layer bf16 (no scales) under
    that quant_algo; an expert left bf16 was a TypeError traceback; with the one linear the exporter probed
    (the first MoE layer's expert 0 w1) left bf16, a bf16 checkpoint was written, every FP8 linear dequantized."""
    q = tmp_path / "q"
    assert cli_run("quantize", "tiny-mixtral", "--format", "fp8", "--rule", rule, "--num-samples", "4",
                   "--seq-len", "64", "-o", q, "--quiet").exit_code == 0
    r = cli_run("export", q, "--format", "trtllm-ckpt", "-o", tmp_path / "t", "--quiet")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # hf-modelopt takes attention left bf16, not experts left bf16 beside FP8 ones (fused_moe.refuse_mixed): for those
    # the way named is the plain fp8 re-quantize ("use --format hf-modelopt" was a second refusal)
    way = "--format hf-modelopt" if rule.startswith("self_attn") else \
        "quantize with --format fp8, then export hf-modelopt"
    assert "decoder linears not in FP8 per tensor" in r.stderr and way in r.stderr, r.stderr
    assert not (tmp_path / "t").exists()


def test_int4_checkpoint_whose_probe_linear_stayed_bf16_is_refused(cli_run, tmp_path):
    """INT4 experts with one w1 left bf16 (as quantize leaves a width it cannot group): refused as INT4, not
    written as a bf16 checkpoint of dequantized weights (W4A8's FP8 activations lost)."""
    q = tmp_path / "q"
    assert cli_run("quantize", "tiny-mixtral", "--format", "int4-gptq", "--rule", "block_sparse_moe.experts.0.w1=none",
                   "--num-samples", "4", "--seq-len", "32", "-o", q, "--quiet").exit_code == 0
    r = cli_run("export", q, "--format", "trtllm-ckpt", "-o", tmp_path / "t", "--quiet")
    assert r.exit_code == 2 and "is quantized as int4" in r.stderr, r.stderr
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("change,expect", [
    ({"sliding_window": 8}, "sliding_window 8"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),  # written as swiglu before: TensorRT-LLM would run SiLU
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}},
     "rope_type 'yarn'"),
])
def test_attention_this_config_cannot_say_is_refused(cli_run, tmp_path, change, expect):
    """rotary_scaling and the attention window are not written: a model with either would be built to
    attend differently from its checkpoint (written as if unscaled and unwindowed before)."""
    src = tmp_path / "m"
    shutil.copytree(MIXTRAL, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **change}))
    r = cli_run("export", src, "--format", "trtllm-ckpt", "-o", tmp_path / "o")
    assert r.exit_code == 2 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "o").exists()


def test_attention_biases_are_refused_not_dropped(cli_run, tmp_path):
    """Qwen3-MoE with attention_bias: true exported with "attn_bias": false and no bias tensor (exit 0):
    an engine built from it would run every attention without its biases."""
    from helpers import make_random_checkpoint

    # widths hf-fp8-block writes in block FP8 (kernel_widths.block_ok), so that the hint can name it
    src = make_random_checkpoint("qwen3_moe", tmp_path / "m", attention_bias=True, hidden_size=128,
                                 moe_intermediate_size=128, head_dim=32)
    r = cli_run("export", src, "--format", "trtllm-ckpt", "-o", tmp_path / "o")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "linear biases (e.g. model.layers.0.self_attn." in r.stderr and "export hf-fp8-block" in r.stderr
    assert not (tmp_path / "o").exists()
    assert cli_run("export", src, "--format", "hf-fp8-block", "-o", tmp_path / "h", "--quiet").exit_code == 0


def test_dense_layers_are_refused_naming_the_keys(cli_run, tmp_path):
    """A dense Qwen3-MoE layer (here from decoder_sparse_step) was refused as "(mlp_only_layers)"."""
    from helpers import make_random_checkpoint

    src = make_random_checkpoint("qwen3_moe", tmp_path / "m", decoder_sparse_step=2)
    r = cli_run("export", src, "--format", "trtllm-ckpt", "-o", tmp_path / "o")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "makes layer(s) [0] dense (decoder_sparse_step=2, mlp_only_layers=[])" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_formats_lists_the_families_it_writes(cli_run):
    """`moepress formats` said "all families" for trtllm-ckpt, which refuses DeepSeek-V3 / Kimi K2."""
    line = next(x for x in cli_run("formats").output.splitlines() if x.startswith("trtllm-ckpt"))
    assert "(mixtral, qwen3_moe)" in line and "all families" not in line


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_rotary_base_from_a_hub_config_with_top_level_rope_theta(tmp_path, family):
    """Qwen3-30B-A3B's and Mixtral-8x7B's config.json on the hub say "rope_theta": 1000000.0 at the top level (no
    rope_parameters; transformers 5 moves it into rope_parameters and has no rope_theta attribute): the engine
    must get rotary_base 1e6, not transformers' absent attribute's fallback 10000."""
    from helpers import make_random_checkpoint
    from moepress.exporters import ExportConfig, export

    src = make_random_checkpoint(family, tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 1000000.0
    (src / "config.json").write_text(json.dumps(cfg))
    export(src, tmp_path / "o", ExportConfig(format="trtllm-ckpt"))
    assert json.loads((tmp_path / "o" / "config.json").read_text())["rotary_base"] == 1000000.0


def test_a_dense_layer_is_refused_before_a_run_prunes_and_quantizes(cli_run, tmp_path):
    """Qwen3-MoE with mlp_only_layers [0]: this exporter writes MoE layers only. The refusal came from the writer at
    layer 0, so `moepress run` pruned, quantized and wrote three exports first, then exited 2 naming no recipe key;
    it is now refused up front, by export.formats, before -o is made."""
    from test_run import write_recipe

    from helpers import make_random_checkpoint

    src = make_random_checkpoint("qwen3_moe", tmp_path / "m", mlp_only_layers=[0], vocab_size=4096)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # the bundled tokenizer (4096 tokens): a run calibrates
        shutil.copy(models.path("tiny-qwen3-moe") / f, src / f)
    r = cli_run("export", src, "--format", "trtllm-ckpt", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "makes layer(s) [0] dense" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    rec = write_recipe(tmp_path / "r.yaml", model=str(src), quantize={"format": "fp8"},
                       export={"formats": ["hf-modelopt", "trtllm-ckpt"]})
    r = cli_run("run", rec, "-o", tmp_path / "run")
    assert r.exit_code == 2 and "export.formats trtllm-ckpt" in r.stderr and "dense" in r.stderr, r.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stored,written", [(torch.float16, "float16"), (torch.float32, "bfloat16")])
def test_unquantized_tensors_keep_a_float16_source_precision(tmp_path, stored, written):
    """A float16 model's unquantized tensors are written float16 (config dtype float16), bit-equal to the source:
    bf16 would drop 3 of their 10 mantissa bits. A float32 one is written bf16, as it is deployed."""
    from moepress.exporters import ExportConfig, export

    src = _copy_as(make_random_checkpoint("mixtral", tmp_path / "m"), tmp_path / "m16", stored)
    export(src, tmp_path / "o", ExportConfig(format="trtllm-ckpt"))
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == written
    rank, r = load_rank(tmp_path / "o", 0), CheckpointReader(src)
    for ours, theirs in (("transformer.vocab_embedding.weight", "model.embed_tokens.weight"),
                         ("lm_head.weight", "lm_head.weight"),
                         ("transformer.layers.0.attention.dense.weight", "model.layers.0.self_attn.o_proj.weight")):
        assert rank[ours].dtype == getattr(torch, written), ours
        assert torch.equal(rank[ours], r.get(theirs).to(getattr(torch, written))), ours


def test_kv_heads_are_replicated_at_a_tp_that_is_a_multiple_of_them(tmp_path):
    """tiny-mixtral's 2 KV heads at TP 4: each rank holds its query head and the whole KV head rank // 2, as
    TensorRT-LLM's converters write it (convert_utils.py dup_kv_weight: each head repeated tp / kv times, then split
    by rank); the config keeps num_key_value_heads 2 (its attention runs ceil(2 / 4) = 1 KV head a rank). The export
    refused TP 4."""
    from moepress.exporters import ExportConfig, export

    export(MIXTRAL, tmp_path / "o", ExportConfig(format="trtllm-ckpt", tp=4, ep=4))
    c = json.loads((tmp_path / "o" / "config.json").read_text())
    assert c["num_key_value_heads"] == 2 and c["mapping"]["tp_size"] == 4
    r = CheckpointReader(MIXTRAL)
    hd = c["head_size"]
    for i in range(c["num_hidden_layers"]):
        q, k, v = (r.get(f"model.layers.{i}.self_attn.{p}_proj.weight") for p in "qkv")
        for rank in range(4):
            qkv = load_rank(tmp_path / "o", rank)[f"transformer.layers.{i}.attention.qkv.weight"]
            want = torch.cat([q[rank * hd:(rank + 1) * hd], k[rank // 2 * hd:(rank // 2 + 1) * hd],
                              v[rank // 2 * hd:(rank // 2 + 1) * hd]])
            assert torch.equal(qkv, want.bfloat16()), (i, rank)
