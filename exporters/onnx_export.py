"""ONNX export for TensorRT (and onnxruntime): the whole (pruned, quantized) model with Q/DQ.

The graph is assembled by hand, one decoder layer at a time from the layer stream: each
layer's weights are read, appended to ``model.onnx.data`` (ONNX external data: location /
offset / length in each TensorProto, onnx/onnx ``docs/ExternalData.md``) and dropped, so the
exporter holds one layer's tensors whatever the model's size; ``model.onnx`` keeps only the
graph. Tensors smaller than ``--option external_min_bytes`` (default 1024) stay inline.

Contract (moepress/checks/candidates/, ``base.ONNX_CONTRACT``): input ``input_ids`` int64 [B, S] -> ``logits``
[B, S, V] and ``hidden_states.{i}`` [B, S, H] (decoder layer i's output, before the final norm).

Weights keep their stored form with DequantizeLinear / QuantizeLinear (opset 21; the forms per
weight-scale granularity are in exporters/onnx_graph.py). MoE routing is in the graph, and every
expert is computed densely, weighted by a [T, E] gate matrix (exporters/onnx_layers.py). Why
dense: static shapes (no data-dependent token gather/NonZero), which TensorRT builds and fuses
well, and exactly the routing math; the cost is E/top_k times the expert FLOPs and an [E, T, I]
activation, fine for validation and small batches; a TopK+Gather of per-token expert weights
would need [T, k, I, H] weight copies instead, worse in memory.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from moepress.compress import formats
from moepress.compress.arch import get_adapter
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.formats import fp8_block
from moepress.errors import MoepressError
from moepress.exporters.base import Exporter
from moepress.exporters.fused_moe import pattern
from moepress.exporters.hints import packed_names
from moepress.exporters.linears import refuse_fp4
from moepress.exporters.onnx_graph import FLOAT, TENSORRT_CHECKED, WRITES, Graph
from moepress.exporters.onnx_layers import LayerBuilder


def refuse_dynamic_inputs(src: Path) -> None:
    """Refuse a checkpoint whose activations are quantized per token at run time (fp8-dynamic, fp8-block):
    TensorRT's Q/DQ takes constant scales (Model-Optimizer's ONNX FP8 uses static ones), and a graph
    without them would run a weight-only model (logits off by ~1 against the checkpoint's own forward)."""
    layout = formats.read_layout(src) or {}
    dynamic = sorted({m["format"] for m in layout.get("modules", {}).values()
                      if m.get("format") in formats.FORMATS and formats.FORMATS[m["format"]].dynamic_input})
    if dynamic:
        raise MoepressError(f"--format onnx: {src} is quantized as {', '.join(dynamic)}, whose activations are "
                            "quantized per token at run time, which ONNX Q/DQ with constant scales cannot hold: "
                            "quantize with --format fp8 (static input scales, or int4-awq, int4-gptq, w4a8-awq: "
                            "they export too), then export onnx, or export the original")


def refuse_input(src: Path, reader: CheckpointReader | None = None, adapter=None) -> None:
    """The stored forms the graph has no Q/DQ for: activations quantized at run time, FP4 weights. ``reader`` /
    ``adapter``: the export's own, opened once."""
    refuse_dynamic_inputs(src)
    reader = reader or CheckpointReader(src)
    refuse_fp4(reader, adapter or get_adapter(reader.config, reader.names()), "--format onnx", WRITES)


# transformers' modeling_rope_utils.dynamic_rope_update: these recompute inv_freq from the sequence
# length in every forward; the graph's frequencies are constants
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def refuse_length_dependent_rope(src: Path, adapter) -> None:
    kind = adapter.build_rotary().rope_type
    if kind in LENGTH_DEPENDENT_ROPE:
        raise MoepressError(f"--format onnx: {src}/config.json has rope_type {kind!r}, whose rotary frequencies "
                            "change with the sequence length; the graph holds constant ones; expected a rope_type "
                            "with fixed frequencies (default, linear, yarn, llama3)")


# the newest opset onnxruntime 1.32 runs this export at: at 28 it has no QuantizeLinear kernel
# ("NOT_IMPLEMENTED: Could not find an implementation for QuantizeLinear(28)")
MAX_OPSET = 27


# transformers' ACT2FN names the graph writes (onnx_layers.LayerBuilder.act)
GRAPH_ACTIVATIONS = ("silu", "swish", "relu", "gelu", "gelu_new", "gelu_pytorch_tanh")


def refuse_activation(src: Path, adapter) -> None:
    """An MLP activation the graph has no ops for, refused before anything is written."""
    act = getattr(adapter.hf_config, "hidden_act", "silu")
    if act not in GRAPH_ACTIVATIONS:
        raise MoepressError(f"--format onnx: {src}/config.json has hidden_act {act!r}, which the graph does not "
                            f"write; expected one of {', '.join(GRAPH_ACTIVATIONS)}")


def refuse_source(src: Path, adapter, reader=None, instead: str | None = None) -> None:
    """What of the source's config.json the graph cannot compute: its rotary embedding and activation (whose
    refusals name the values the graph takes: ``instead`` is not needed)."""
    refuse_length_dependent_rope(src, adapter)
    refuse_activation(src, adapter)


PROTOBUF_LIMIT = 2**31 - 2**20  # a protobuf message is at most 2 GiB; the graph's own nodes take the rest


def _min_bytes(cfg) -> int:
    """--option external_min_bytes: a byte count, 0 or more (default 1024)."""
    try:
        min_bytes = int(cfg.option("external_min_bytes", 1024))
        if min_bytes < 0:
            raise ValueError
    except ValueError:
        raise MoepressError(f"--option external_min_bytes={cfg.option('external_min_bytes')}: expected an "
                            f"integer byte count, 0 or more") from None
    return min_bytes


def refuse_config(cfg) -> None:
    """The export's options, before anything is read: --opset within what this export needs and onnxruntime runs,
    --option external_min_bytes a byte count."""
    _min_bytes(cfg)
    refuse_opset(cfg)


def refuse_opset(cfg) -> None:
    """--opset within what this export needs and onnxruntime runs."""
    if cfg.opset < 21:
        raise MoepressError(f"--opset {cfg.opset}: the ONNX export needs opset 21 or newer "
                            f"(INT4 and block-wise DequantizeLinear)")
    newest = min(onnx.defs.onnx_opset_version(), MAX_OPSET)
    if cfg.opset > newest:
        raise MoepressError(f"--opset {cfg.opset}: expected 21..{newest} (the newest opset onnx {onnx.__version__} "
                            f"defines and onnxruntime runs this export at)")
    if not _loads_opset(cfg.opset):
        import onnxruntime

        runs = next((o for o in range(cfg.opset - 1, 20, -1) if _loads_opset(o)), None)
        expected = f"expected 21..{runs}" if runs else "it runs none from 21 on: a newer onnxruntime is needed"
        raise MoepressError(f"--opset {cfg.opset}: onnxruntime {onnxruntime.__version__} refuses graphs of that "
                            f"opset (newer than the onnx releases it knows); {expected}")


@cache  # an export asks refuse_config twice (exporters.export, then the exporter itself)
def _loads_opset(opset: int) -> bool:
    """Whether the installed onnxruntime loads a one-node graph stamped with ``opset``: a release refuses opsets
    newer than the onnx releases it knows (onnxruntime 1.20 at onnx 1.17's 22: "Opset 22 is under development"),
    whatever onnx defines. True where onnxruntime is not installed (the graph's other consumer is TensorRT)."""
    try:
        import onnxruntime
    except ImportError:
        return True
    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y"))
    m = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y]),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = helper.find_min_ir_version_for(list(m.opset_import))
    try:
        onnxruntime.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime's Fail / InvalidGraph: the opset is not one it loads
        return False
    return True


def _not_carried(reader, adapter) -> tuple[list[str], list[str], list[str]]:
    """What the graph does not hold as the checkpoint does, for export.json (tensors dropped, layers dropped, notes):
    the FP8 KV-cache scales (no KV cache),
    DeepSeek's MTP layers (next-token logits only), compressed-tensors packed INT4 modules (decoded: bf16
    initializers without Q/DQ) and a native block-FP8 checkpoint's dynamic activation quantization."""
    scales = [n for n in reader.names() if n.endswith((".k_scale", ".v_scale"))]
    mtp = [adapter.layer_prefix(i).rstrip(".") for i in adapter.mtp_layers()]
    packed = packed_names(reader)
    native = formats.layout_of(reader) is None and fp8_block.dynamic_native(reader.config)
    notes = [f"the FP8 KV-cache scales ({len(scales)} k_scale / v_scale) are not carried: the graph has no KV "
             f"cache (attention over the whole sequence in one forward)"] if scales else []
    if mtp:
        notes.append(f"the multi-token-prediction layer(s) {', '.join(mtp)} are not carried: the graph gives the "
                     "next token's logits only")
    if packed:
        notes.append(f"{len(packed)} compressed-tensors packed modules (e.g. {packed[0].rsplit('.', 1)[0]}) are "
                     "written decoded, as bf16 initializers without Q/DQ")
    if native:  # DeepSeek-V3 / Kimi K2 as they ship: the only FP8 checkpoint the graph takes without static scales
        notes.append("the checkpoint's runtimes quantize its block-FP8 linears' inputs per token in 1x128 groups "
                     "(config activation_scheme dynamic); the graph quantizes their weights only")
    return scales, mtp, notes


def export_onnx(src: Path, writer, cfg, progress) -> dict:
    refuse_config(cfg)
    reader = CheckpointReader(src)
    adapter = get_adapter(reader.config, reader.names())
    refuse_input(src, reader, adapter)
    refuse_source(src, adapter)
    g = Graph(writer.partial / "model.onnx.data", _min_bytes(cfg))
    b = LayerBuilder(g, reader, adapter)
    outputs = []
    try:
        emb = g.op("Gather", [b.g.init(adapter.embed_name, reader.get(adapter.embed_name)), "input_ids"], axis=0)
        h = g.op("Cast", [emb], to=FLOAT)
        cos, sin = b.rotary("input_ids")
        H = adapter.hidden_size
        with progress.task("export onnx", adapter.num_layers) as task:
            for i in range(adapter.num_layers):
                h = b.layer(i, h, cos, sin)
                name = f"hidden_states.{i}"
                g.op("Identity", [h], out=[name])
                outputs.append(helper.make_tensor_value_info(name, FLOAT, ["batch", "sequence", H]))
                task.advance(note=f"layer {i}")
        hn = b.rmsnorm(h, adapter.norm_name, float(adapter.hf_config.rms_norm_eps))
        head = adapter.head_name if adapter.head_name in reader else adapter.embed_name
        w = b.plain(head + ".head" if head == adapter.embed_name else head, reader.get(head))
        g.op("MatMul", [hn, g.op("Transpose", [w], perm=[1, 0])], out=["logits"])
    finally:
        g.close()
    graph = helper.make_graph(
        g.nodes, f"moepress-{adapter.family}",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", FLOAT, ["batch", "sequence", adapter.vocab_size]), *outputs],
        initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", cfg.opset)], producer_name="moepress")
    # the lowest IR version the opset allows (onnx's VERSION_TABLE: opset 21-22 -> IR 10, 23 -> 11, ...),
    # so that older runtimes load what they can run
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    inline = sum(len(i.raw_data) for i in g.inits)
    if inline > PROTOBUF_LIMIT:  # onnx.save would fail serializing it (protobuf's EncodeError), after the whole pass
        raise MoepressError(f"--option external_min_bytes={_min_bytes(cfg)}: {inline} bytes of tensors inline in "
                            f"model.onnx, over protobuf's 2 GiB; expected a threshold that moves more of them to "
                            f"the external data file (default 1024)")
    onnx.save(model, str(writer.partial / "model.onnx"))
    writer.copy_aux_files(src)
    dropped, layers, notes = _not_carried(reader, adapter)
    return {"onnx": {"file": "model.onnx", "external_data": g.data_path.name, "opset": cfg.opset,
                     "nodes": len(g.nodes), "initializers": len(g.inits), "data_bytes": g.offset,
                     "weight_schemes": sorted(b.schemes), "moe": "dense experts x scattered top-k gate"},
            "dropped": dropped, **({"dropped_layers": layers} if layers else {}),
            "consumer_notes": notes + _tensorrt_notes(b), **_tensorrt_misloads(b)}


def _tensorrt_misloads(b) -> dict:
    """export.json's ``misloaded_by`` / ``misloaded_why`` for TensorRT (``moepress build --builder tensorrt``
    refuses the export; onnxruntime runs it): weights whose DequantizeLinear TensorRT does not take
    (onnx_graph.py ``TENSORRT_INT4_BLOCKS``)."""
    if not b.tensorrt_rejects:
        return {}
    why = "; ".join(f"{what}: {pattern(n.removesuffix('.weight') for n in names)}"
                    for (what, _), names in b.tensorrt_rejects.items())
    return {"misloaded_by": {"tensorrt": TENSORRT_CHECKED},
            "misloaded_why": {"tensorrt": f"refuses the graph's weights ({why}); onnxruntime runs it"}}


def _tensorrt_notes(b) -> list[str]:
    """What TensorRT makes of the graph, where it differs from what the checkpoint's format says."""
    notes = [f"TensorRT <= {TENSORRT_CHECKED} {_tensorrt_misloads(b)['misloaded_why']['tensorrt']}: "
             f"{'; or '.join(dict.fromkeys(hint for _, hint in b.tensorrt_rejects))}"] if b.tensorrt_rejects else []
    if b.weight_only_int4:
        notes.append(f"TensorRT runs INT4 weight-only: the FP8 Q/DQ in front of the INT4 linears "
                     f"({pattern(b.weight_only_int4)}) is computed as fake quantization, not an FP8 x INT4 GEMM")
    return notes


EXPORTER = Exporter(
    "onnx", export_onnx, description="ONNX with QuantizeLinear/DequantizeLinear (FP8, INT4 block-wise, opset 21) "
    "and MoE routing in the graph", consumers="TensorRT (trtexec / ONNX parser), onnxruntime",
    options=("external_min_bytes",), check_config=refuse_config, refuse_source=refuse_source, refuse_input=refuse_input,
    # refuse_dynamic_inputs; FP4 has no Q/DQ form here (onnx_layers.py)
    writes_format=lambda f: not f.dynamic_input and f.element != "fp4",
)
