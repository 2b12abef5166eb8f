"""Model cards (moepress/pipeline/card.py), row by row, on a hand-made export directory and recipes
`moepress recipe show` accepts: properties no other test pinned (a mutation audit planted each bug and the
suite passed). Each takes milliseconds: no stage runs."""

import json
from importlib import metadata

import pytest

from moepress.manifest import file_digests, versions, write_manifest
from moepress.pipeline.card import Accuracy, model_card
from moepress.pipeline.recipe import normalise

SOURCE = "/models/tiny-qwen3-moe"
PASSED = {"passed": True, "failed": [], "metrics": {"kl_mean": 0.012345, "top1_agreement": 0.875},
          "gates": [{"metric": "kl_mean", "op": "<=", "threshold": 0.05, "value": 0.012345, "passed": True}]}


def _export(tmp_path, name="hf-modelopt", **files):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    for f, obj in files.items():
        (d / f"{f}.json").write_text(json.dumps(obj))
    write_manifest(d, {"files": file_digests(d), "versions": versions()})
    return d


def _card(d, recipe, acc=None, prune=None, fmt="hf-modelopt"):
    return model_card(d, fmt, normalise({"model": "tiny-qwen3-moe", **recipe}), SOURCE, acc or Accuracy(PASSED), prune)


def _row(card, name):
    return next(ln for ln in card.splitlines() if ln.startswith(f"| {name} |"))


# the prune stage's result as the runner records it (compress/prune/stage.py summary: num_experts is the source's
# count, kept the count every pruned layer keeps)
PRUNED = {"method": "auto", "chosen": "reap", "num_experts": 16, "kept": 12}


def test_card_prune_row_states_keep_and_the_method_auto_chose(tmp_path):
    card = _card(_export(tmp_path), {"prune": {"keep": 12, "method": "auto"}}, prune=PRUNED)
    assert _row(card, "pruning").startswith("| pruning | auto method (chose reap), keep 12 of routed experts;")
    # a method named in the recipe and run as asked is not said twice
    card = _card(tmp_path / "hf-modelopt", {"prune": {"ratio": 0.25, "method": "reap"}},
                 prune={**PRUNED, "method": "reap"})
    assert _row(card, "pruning").startswith("| pruning | reap method, ratio 0.25 of routed experts;")


def test_card_says_how_many_experts_each_pruned_layer_keeps(tmp_path):
    """The prune result's ``kept`` (12), not the source's ``num_experts`` (16)."""
    card = _card(_export(tmp_path), {"prune": {"ratio": 0.25, "method": "auto"}}, prune=PRUNED)
    assert _row(card, "pruning").endswith("; 12 kept per MoE layer |")


def test_card_quantization_row_names_the_rules(tmp_path):
    rules = {"mlp.experts.*": "fp8-dynamic"}
    card = _card(_export(tmp_path), {"quantize": {"rules": rules}})
    assert _row(card, "quantization") == f"| quantization | rules, rules {json.dumps(rules)} |"


def test_card_calibration_row_only_where_a_stage_read_calibration_data(tmp_path):
    d = _export(tmp_path)
    # pruning reads calibration data even before a calibration-free format (FP8 dynamic: QuantConfig says so)
    card = _card(d, {"prune": {"ratio": 0.25}, "quantize": {"format": "fp8-dynamic"},
                     "calib": {"sources": ["a.txt", "b.jsonl"], "num_samples": 8, "seq_len": 64, "seed": 3}})
    assert _row(card, "calibration") == "| calibration | 8 samples x 64 tokens, seed 3, a.txt, b.jsonl |"
    assert "| calibration |" not in _card(d, {"quantize": {"format": "fp8-dynamic"}})
    assert "| calibration |" not in _card(d, {"quantize": {"format": "fp8-block"}})


def test_card_title_version_and_loading_paths(tmp_path):
    d = _export(tmp_path, tokenizer_config={"auto_map": {"AutoTokenizer": ["tok.T", None]}})
    card = _card(d, {"quantize": {"format": "fp8-dynamic"}})
    assert card.startswith("# tiny-qwen3-moe — hf-modelopt\n")
    assert f"Made with [moepress](https://github.com/moepress/moepress) {metadata.version('moepress')} from" in card
    assert "trtllm-serve ./hf-modelopt --backend pytorch" in card and 'LLM(model="./hf-modelopt")' in card
    assert str(tmp_path) not in card  # the card travels with the directory: paths relative to it
    # a tokenizer of the checkpoint's own code (auto_map only in tokenizer_config.json) needs trust_remote_code
    assert "`trust_remote_code=True`" in card


def test_card_accuracy_lists_the_gates_applied_and_every_metric(tmp_path):
    card = _card(_export(tmp_path), {"quantize": {"format": "fp8-dynamic"}})
    assert "Gates passed (kl_mean <= 0.05)." in card
    assert "| kl_mean | 0.01235 |" in card and "| top1_agreement | 0.875 |" in card


@pytest.mark.parametrize("kind,says", [("transformers", "transformers' own loader"), ("onnx", "onnxruntime")])
def test_card_says_which_runtime_measured_its_figures(tmp_path, kind, says):
    """A compressed-tensors export is checked through transformers, which may compute its experts on unquantized
    activations where vLLM quantizes them: the figures are that runtime's, said beside them."""
    card = _card(_export(tmp_path), {"quantize": {"format": "fp8"}}, acc=Accuracy({**PASSED, "kind": kind}))
    assert f"Measured through {says}" in card, card


def test_card_names_gates_not_measured_as_such(tmp_path):
    """A pruned candidate's expert gates are not measured (passed null): the card listed them among the gates
    passed."""
    unmeasured = {"metric": "max_expert_error", "op": "<=", "threshold": 0.5, "value": None, "passed": None}
    acc = Accuracy({**PASSED, "gates": [*PASSED["gates"], unmeasured]})
    card = _card(_export(tmp_path), {"quantize": {"format": "fp8-dynamic"}}, acc=acc)
    assert "Gates passed (kl_mean <= 0.05). Not measured: max_expert_error." in card


def test_card_size_is_every_listed_file_but_the_card_itself(tmp_path):
    """The size row counts the artifact's files on disk, not the card (listed once a run wrote it: the size
    a rerun states must not grow by the card's own bytes)."""
    d = _export(tmp_path, export={"consumer_notes": ["x" * 40_000]})
    (d / "README.md").write_text("y" * 30_000)
    write_manifest(d, {"files": file_digests(d), "versions": versions()})
    size = sum(p.stat().st_size for p in d.iterdir() if p.name not in ("README.md", "moepress-manifest.json"))
    card = _card(d, {"quantize": {"format": "fp8-dynamic"}})
    assert _row(card, "size on disk") == f"| size on disk | {size / 1e6:.2f} MB |" == "| size on disk | 0.04 MB |"


def test_card_serves_with_the_runtimes_its_export_does_not_say_misload_it(tmp_path):
    """export.json's misloaded_by names transformers and, for packed DeepSeek MLA projections, SGLang: the card
    sent such an export to "vLLM or SGLang"."""
    why = {"transformers": "drops weight_global_scale", "sglang": "fails loading its packed MLA projections"}
    for by, serve in (({"transformers": "5.24"}, "serve it with vLLM or SGLang."),
                      ({"transformers": "5.24", "sglang": "0.5.23"}, "serve it with vLLM.")):
        (tmp_path / str(len(by))).mkdir()
        d = _export(tmp_path / str(len(by)), name="compressed-tensors",
                    export={"misloaded_by": by, "misloaded_why": {k: why[k] for k in by}})
        card = _card(d, {"quantize": {"format": "nvfp4"}}, fmt="compressed-tensors")
        assert "transformers <= 5.24 drops weight_global_scale" in card and serve in card, card


def test_card_of_an_export_tensorrt_llm_misloads_gives_no_tensorrt_llm_command(tmp_path):
    """hf-modelopt's DeepSeek MLA projections TensorRT-LLM misreads (export.json misloaded_by tensorrt_llm): the card
    told the reader to trtllm-serve it; it names the failure and serves it with vLLM."""
    why = "fails loading its quantized MLA kv_b_proj (layers.*.self_attn.kv_b_proj: KeyError)"
    d = _export(tmp_path, name="hf-modelopt",
                export={"misloaded_by": {"tensorrt_llm": "main 2026-09"}, "misloaded_why": {"tensorrt_llm": why}})
    card = _card(d, {"quantize": {"format": "fp8"}}, fmt="hf-modelopt")
    assert f"**TensorRT-LLM <= main 2026-09 {why}**: serve it with vLLM." in card, card
    assert "trtllm-serve" not in card and "vllm serve" in card, card
    (tmp_path / "ok").mkdir()
    card = _card(_export(tmp_path / "ok", name="hf-modelopt", export={}), {"quantize": {"format": "fp8"}},
                 fmt="hf-modelopt")
    assert "trtllm-serve ./hf-modelopt --backend pytorch" in card and "TensorRT-LLM <=" not in card, card


def test_card_of_an_export_vllm_misloads_gives_no_vllm_command(tmp_path):
    """A MIXED_PRECISION hf-modelopt export with INT4 attention, which vLLM 0.33's MIXED_PRECISION config loads as
    unquantized linears (export.json misloaded_by vllm): the card told the reader to vllm serve it; it names the
    failure, and a TensorRT-LLM failure beside it no longer sends the reader to vLLM."""
    why = {"vllm": "fails loading its W4A16_AWQ linears (model.layers.*.self_attn.q_proj: unquantized)",
           "tensorrt_llm": "fails loading its quantized MLA kv_b_proj (KeyError)"}
    d = _export(tmp_path, name="hf-modelopt",
                export={"misloaded_by": {"vllm": "0.33.0"}, "misloaded_why": {"vllm": why["vllm"]}})
    card = _card(d, {"quantize": {"format": "nvfp4"}}, fmt="hf-modelopt")
    assert f"**vLLM <= 0.33.0 {why['vllm']}**" in card and "vllm serve" not in card, card
    assert "trtllm-serve ./hf-modelopt --backend pytorch" in card, card
    (tmp_path / "both").mkdir()
    d = _export(tmp_path / "both", name="hf-modelopt",
                export={"misloaded_by": {"vllm": "0.33.0", "tensorrt_llm": "main 2026-09"}, "misloaded_why": why})
    card = _card(d, {"quantize": {"format": "nvfp4"}}, fmt="hf-modelopt")
    assert "vllm serve" not in card and "trtllm-serve" not in card and "serve it with vLLM" not in card, card


def test_card_of_an_export_sglang_misloads_does_not_send_it_to_sglang(tmp_path):
    """A MIXED_PRECISION hf-modelopt export SGLang 0.5.23 misreads (export.json misloaded_by sglang, e.g. FP8
    experts + INT4 attention, which it loads as W4AFp8Config): the card said "vLLM and SGLang read the same
    directory"; it names vLLM alone and lists SGLang's failure among the consumer notes."""
    why = "fails on or misreads a MIXED_PRECISION export without an NVFP4 layer (FP8 / W4A8_AWQ: W4AFp8Config)"
    d = _export(tmp_path, name="hf-modelopt", export={"misloaded_by": {"sglang": "0.5.23"}, "misloaded_why":
                                                     {"sglang": why}, "consumer_notes": [f"SGLang <= 0.5.23 {why}"]})
    card = _card(d, {"quantize": {"format": "fp8"}}, fmt="hf-modelopt")
    assert "vLLM reads the same directory" in card and "vLLM and SGLang read" not in card, card
    assert f"- SGLang <= 0.5.23 {why}" in card and "vllm serve ./hf-modelopt" in card, card
    (tmp_path / "ok").mkdir()
    card = _card(_export(tmp_path / "ok", name="hf-modelopt", export={}), {"quantize": {"format": "fp8"}})
    assert "vLLM and SGLang read the same directory" in card, card


@pytest.mark.parametrize("fmt,who,command", [
    ("onnx", "tensorrt", "trtexec"),  # INT4 in blocks of 32 / block-FP8 weights: TensorRT refuses the graph
    ("hf-fp8-block", "transformers", "from_pretrained"),  # a partial fused group transformers misreads
    ("compressed-tensors", "vllm", "vllm serve"),
])
def test_card_of_any_export_gives_no_command_for_a_runtime_its_export_says_misloads_it(tmp_path, fmt, who, command):
    """The onnx, hf-fp8-block and compressed-tensors cards kept their trtexec / from_pretrained / vllm serve
    lines whatever export.json's misloaded_by said (only hf-modelopt's and compressed-tensors' transformers
    slots read it)."""
    why = "refuses the graph's weights (INT4 weights in blocks of 32)"
    d = _export(tmp_path, name=fmt, export={"misloaded_by": {who: "9.9"}, "misloaded_why": {who: why}})
    card = _card(d, {"quantize": {"format": "fp8"}}, fmt=fmt)
    assert f"<= 9.9 {why}**" in card and command not in card, card
    (tmp_path / "ok").mkdir()
    assert command in _card(_export(tmp_path / "ok", name=fmt, export={}), {"quantize": {"format": "fp8"}}, fmt=fmt)


def test_a_rerun_withdraws_the_cards_of_the_run_before_until_its_checks_end(tmp_path):
    """A rerun records each check in its export's manifest as it ends and writes the cards after the last: meanwhile,
    or after a kill, an export's card said "Gates passed" beside a manifest recording the new check failed. At
    the start of the run each card is replaced by a note that the export is being made again, listed as such."""
    import hashlib

    from moepress.manifest import read_manifest
    from moepress.pipeline.card import withdraw_cards, write_card

    (tmp_path / "export").mkdir()
    d, mine = (_export(tmp_path / "export", name=n, export={}) for n in ("hf-modelopt", "mine"))
    write_card(d, _card(d, {"quantize": {"format": "fp8"}}), {"recipe": {}})
    (mine / "README.md").write_text("the user's own")
    assert "Gates passed" in (d / "README.md").read_text()
    withdraw_cards(tmp_path, ["hf-modelopt", "mine"])
    assert (mine / "README.md").read_text() == "the user's own"  # no run wrote it
    text = (d / "README.md").read_text()
    assert "Gates passed" not in text and "not measured yet" in text, text
    assert read_manifest(d)["files"]["README.md"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()


def test_onnx_card_gives_trtexec_the_input_shapes(tmp_path):
    """trtexec fixes a dynamic dimension given no shape to 1 (samples/common/sampleEngines.cpp): the card's command
    built an engine taking one token of one sequence."""
    d = _export(tmp_path, name="onnx", export={})
    (d / "config.json").unlink()  # an onnx export holds none: the source's says the positions
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "max_position_embeddings": 1024}))
    card = model_card(d, "onnx", normalise({"model": "tiny-qwen3-moe", "quantize": {"format": "fp8"}}), src,
                      Accuracy(PASSED))
    assert "--minShapes=input_ids:1x1 --optShapes=input_ids:8x512 --maxShapes=input_ids:8x1024" in card, card


def _card_with(tmp_path, verdict: str):
    p = tmp_path / "README.md"
    p.write_text("\n".join(["# m — onnx", "", "Made with [moepress](https://github.com/moepress/moepress) 0.1.0 "
                            "from `m`.", "", "## Accuracy against the original", "", verdict, "",
                            "| metric | value |", "|---|---|", "| kl_mean | 0.01 |", ""]))
    return p


def test_a_card_saying_passed_beside_a_failed_check_of_the_same_metrics_is_stale(tmp_path):
    """publish's card check reads the verdict line too: the same metrics under a stricter gate failed, and a card
    still saying "Gates passed" is not the manifest's check."""
    from moepress.pipeline.card import card_differs

    gate = {"metric": "kl_mean", "value": 0.01, "op": "<="}
    passed = {"passed": True, "failed": [], "metrics": {"kl_mean": 0.01},
              "gates": [{**gate, "threshold": 0.05, "passed": True}]}
    failed = {"passed": False, "failed": ["kl_mean"], "metrics": {"kl_mean": 0.01},
              "gates": [{**gate, "threshold": 0.005, "passed": False}]}
    assert card_differs(_card_with(tmp_path, "Gates passed (kl_mean <= 0.05)."), passed) is None
    assert card_differs(_card_with(tmp_path, "Gates FAILED: kl_mean."), failed) is None
    why = card_differs(_card_with(tmp_path, "Gates passed (kl_mean <= 0.05)."), failed)
    assert why is not None and "Gates FAILED: kl_mean." in why


@pytest.mark.parametrize("files, needs", [
    ({"config": {"model_type": "qwen3_moe", "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}}, False),
    ({"config": {"model_type": "kimi_k2", "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}}, True),
    ({"tokenizer_config": {"tokenizer_class": "PreTrainedTokenizerFast", "auto_map": {"AutoTokenizer": ["t.T"]}}},
     False),
    ({"tokenizer_config": {"tokenizer_class": "TikTokenTokenizer", "auto_map": {"AutoTokenizer": ["t.T"]}}}, True),
])
def test_card_asks_for_remote_code_only_where_transformers_has_no_class_of_its_own(tmp_path, files, needs):
    """transformers loads a qwen3_moe model, or a PreTrainedTokenizerFast tokenizer, with its own classes; with
    trust_remote_code it runs the checkpoint's auto_map code instead (audit82: a card told users to pass it for a
    stranger's modeling file). kimi_k2 and TikTokenTokenizer are not transformers' own."""
    card = _card(_export(tmp_path, **files), {"quantize": {"format": "fp8-dynamic"}})
    assert ("pass `--trust-remote-code`" in card) is needs, card
    assert ("Load it without `--trust-remote-code`" in card) is not needs, card
