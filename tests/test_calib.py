"""Calibration data, cache, observers and `moepress calib prepare | stats` (issue #3)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers import assert_one_line_error
from moepress import models
from moepress.calib.data import allocate, calibration_batches, calibration_set, load_tokenizer
from moepress.calib.distributed import shard
from moepress.calib.observers import InputAbsMax, LayerRouting, RoutingStats
from moepress.calib.sources.spec import BUNDLED_CALIB
from moepress.calib.stats import collect

QWEN = "tiny-qwen3-moe"
ROUTERS = {"Qwen3MoeTopKRouter", "MixtralTopKRouter", "DeepseekV3TopkRouter"}


@pytest.fixture(autouse=True, scope="module")
def _cache_dir(tmp_path_factory):
    """A cache of our own, so tests see cold and warm caches they made themselves."""
    old = os.environ.get("MOEPRESS_CACHE")
    os.environ["MOEPRESS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield Path(os.environ["MOEPRESS_CACHE"])
    if old is None:
        os.environ.pop("MOEPRESS_CACHE")
    else:
        os.environ["MOEPRESS_CACHE"] = old


@pytest.fixture(scope="module")
def qwen():
    return models.path(QWEN)


@pytest.fixture(scope="module")
def tok(qwen):
    return load_tokenizer(qwen)


# ---- acceptance: routed counts == transformers' own routers ------------------------------------

def transformers_router_counts(model_dir, batches):
    """Per MoE layer: tokens routed to each expert, gate mass, from hooks on transformers' router modules."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    counts, mass, hooks = {}, {}, []
    for name, mod in model.named_modules():
        if type(mod).__name__ in ROUTERS:
            i = int(name.split("layers.")[1].split(".")[0])
            e = mod.weight.shape[0]
            counts[i] = torch.zeros(e, dtype=torch.int64)
            mass[i] = torch.zeros(e, dtype=torch.float64)

            def hook(mod, args, out, i=i):
                _logits, weights, indices = out
                counts[i] += torch.bincount(indices.reshape(-1), minlength=counts[i].numel())
                mass[i].index_add_(0, indices.reshape(-1), weights.reshape(-1).double())
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return counts, mass


@pytest.mark.parametrize("name", models.BUNDLED)
def test_routed_counts_equal_transformers_routers(name):
    path = models.path(name)
    batches = calibration_batches(path, num_samples=8, seq_len=128, seed=3, batch_size=4)
    stats, _, facts = collect(path, batches)
    want, mass = transformers_router_counts(path, batches)
    assert sorted(want) == sorted(stats.layers) == facts["moe_layers"] and want
    tokens = sum(b.numel() for b in batches)
    for i, lr in stats.layers.items():
        assert torch.equal(lr.counts, want[i]), f"{name} layer {i}"
        assert lr.tokens == tokens and int(lr.counts.sum()) == tokens * facts["top_k"]
        assert torch.equal(lr.coselect.diagonal(), lr.counts)
        torch.testing.assert_close(lr.gate_sum, mass[i], rtol=1e-6, atol=1e-7)  # measured 3.1e-7 relative


# ---- sampling ---------------------------------------------------------------------------------

def test_sampling_is_reproducible_and_cached(qwen, _cache_dir):
    a = calibration_set(qwen, num_samples=16, seq_len=64, seed=0)
    assert not a.cached and a.input_ids.shape == (16, 64) and a.input_ids.dtype == torch.long
    b = calibration_set(qwen, num_samples=16, seq_len=64, seed=0)
    assert b.cached and torch.equal(a.input_ids, b.input_ids)
    # the same description either way (a stage's stats.json / manifest must not depend on the cache's state)
    same = lambda m: {k: v for k, v in m.items() if k != "created"}  # noqa: E731
    assert same(b.meta) == same(a.meta)
    fresh = calibration_set(qwen, num_samples=16, seq_len=64, seed=0, cache=False)
    assert torch.equal(a.input_ids, fresh.input_ids)
    named = calibration_set(qwen, ("bundled",), num_samples=16, seq_len=64, seed=0)
    assert named.cached and torch.equal(a.input_ids, named.input_ids)  # same contents, same key
    c = calibration_set(qwen, num_samples=16, seq_len=64, seed=1, cache=False)
    assert not torch.equal(a.input_ids, c.input_ids)
    # different seed: different windows, not just another order
    assert {tuple(r) for r in a.input_ids.tolist()} != {tuple(r) for r in c.input_ids.tolist()}
    # the cache holds one token file + sidecar per set, keyed by what made it
    files = sorted(p.name for p in (_cache_dir / "calib").glob("*.safetensors"))
    assert f"{a.meta['key']}.safetensors" in files
    # batches keep their meaning: num_samples rows of seq_len, split by batch_size
    batches = calibration_batches(qwen, num_samples=16, seq_len=64, seed=0, batch_size=5)
    assert [tuple(x.shape) for x in batches] == [(5, 64), (5, 64), (5, 64), (1, 64)]
    assert torch.equal(torch.cat(batches), a.input_ids)


def test_windows_are_real_text_windows(qwen, tok):
    """Pack mode over the bundled text: every sample is a contiguous window of the tokenized text."""
    cs = calibration_set(qwen, num_samples=8, seq_len=32, seed=5, cache=False)
    text = (Path(models.__file__).parent.parent / "calib" / "data" / "calib.txt").read_text()
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"] + [tok.eos_token_id]
    rows = {tuple(ids[k * 32:(k + 1) * 32]) for k in range(len(ids) // 32)}
    assert all(tuple(r) in rows for r in cs.input_ids.tolist())


def test_allocate_and_shard():
    assert allocate(10, [1, 1, 1]) == [4, 3, 3]
    assert allocate(7, [3, 1]) == [5, 2]
    assert allocate(5, [1]) == [5]
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert shard(items[:1], 1, 2) == []


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same documents as JSONL, Parquet and a saved datasets folder, plus text, chat and bad files."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("sources")
    text = (Path(models.__file__).parent.parent / "calib" / "data" / "eval.txt").read_text()
    docs = [p for p in text.split("\n\n") if len(p) > 200][:60]
    with open(d / "docs.jsonl", "w") as f:
        for k, t in enumerate(docs):
            f.write(json.dumps({"id": k, "content": t}) + "\n")
    pq.write_table(pa.table({"id": list(range(len(docs))), "content": docs}), d / "docs.parquet")
    datasets.Dataset.from_dict({"content": docs}).save_to_disk(str(d / "docs_ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:30]}),
                          "test": datasets.Dataset.from_dict({"text": docs[30:]})}).save_to_disk(str(d / "dd"))
    (d / "folder").mkdir()
    for k in range(4):
        (d / "folder" / f"part{k}.txt").write_text("\n\n".join(docs[k::4]))
    (d / "folder" / "empty.txt").write_text("")
    (d / "folder" / "ignored.bin").write_bytes(b"\xff\xfe")
    with open(d / "chat.jsonl", "w") as f:
        for k, t in enumerate(docs[:20]):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Explain this code {k}."},
                                             {"role": "assistant", "content": t}]}) + "\n")
    (d / "empty.txt").write_text("")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (d / "short.txt").write_text("def f(): pass\n")
    (d / "zeros.txt").write_bytes(b"\0" * 20000)  # valid UTF-8: calibrated on NUL tokens before
    (d / "nofield.jsonl").write_text('{"body": "x"}\n{"body": "y"}\n')
    (d / "data.xyz").write_text("hello")
    return d


def test_a_null_text_is_an_empty_document_in_jsonl_as_in_parquet(qwen, sources, tmp_path):
    """A null in a Parquet column read as an empty document; the same null in a JSONL line was refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [json.loads(line)["content"] for line in (sources / "docs.jsonl").read_text().splitlines()][:20]
    docs[3] = docs[11] = None
    with open(tmp_path / "n.jsonl", "w") as f:
        f.writelines(json.dumps({"content": t}) + "\n" for t in docs)
    pq.write_table(pa.table({"content": docs}), tmp_path / "n.parquet")
    kw = dict(num_samples=8, seq_len=48, seed=1, cache=False)
    j = calibration_set(qwen, (f"{tmp_path}/n.jsonl,field=content",), **kw)
    p = calibration_set(qwen, (f"{tmp_path}/n.parquet,field=content",), **kw)
    assert torch.equal(j.input_ids, p.input_ids)


def test_jsonl_parquet_dataset_give_the_same_samples(qwen, sources):
    kw = dict(num_samples=12, seq_len=48, seed=2, cache=False)
    j = calibration_set(qwen, (f"{sources}/docs.jsonl,field=content",), **kw)
    p = calibration_set(qwen, (f"{sources}/docs.parquet,field=content",), **kw)
    ds = calibration_set(qwen, (f"{sources}/docs_ds,field=content",), **kw)
    assert torch.equal(j.input_ids, p.input_ids) and torch.equal(j.input_ids, ds.input_ids)
    assert j.meta["sources"][0]["type"] == "jsonl" and p.meta["sources"][0]["type"] == "parquet"
    assert ds.meta["sources"][0]["type"] == "dataset"
    # pack mode joins documents with EOS (id 0 in the tiny tokenizer)
    assert (j.input_ids == 0).any()
    # truncate: one document per sample, its first seq-len tokens
    t = calibration_set(qwen, (f"{sources}/docs.jsonl,field=content,mode=truncate",), **kw)
    tok = load_tokenizer(qwen)
    starts = {tuple(tok(json.loads(line)["content"], verbose=False)["input_ids"][:48])
              for line in (sources / "docs.jsonl").read_text().splitlines()}
    assert all(tuple(r) in starts for r in t.input_ids.tolist())
    # a DatasetDict picks its split
    a = calibration_set(qwen, (f"{sources}/dd",), **kw)
    b = calibration_set(qwen, (f"{sources}/dd,split=test",), **kw)
    assert a.meta["sources"][0]["documents"] == 30 and not torch.equal(a.input_ids, b.input_ids)


def test_chat_messages_use_the_chat_template(qwen, sources, tok):
    cs = calibration_set(qwen, (f"{sources}/chat.jsonl,mode=truncate",), num_samples=6, seq_len=24, seed=0,
                         cache=False)
    head = tok("<|im_start|>user\nExplain this code", add_special_tokens=False)["input_ids"]
    assert all(r[: len(head)] == head for r in cs.input_ids.tolist())


def test_mixing_by_weight_and_folders(qwen, sources):
    cs = calibration_set(qwen, (f"{sources}/folder@3", f"{sources}/docs.jsonl,field=content,weight=1"),
                         num_samples=12, seq_len=32, seed=0, cache=False)
    assert [s["samples"] for s in cs.meta["sources"]] == [9, 3]
    assert torch.bincount(cs.source).tolist() == [9, 3]
    assert cs.meta["sources"][0]["documents"] == 4  # the empty file and the .bin are left out
    assert cs.source.tolist() != sorted(cs.source.tolist())  # shuffled together
    again = calibration_set(qwen, (f"{sources}/folder@3", f"{sources}/docs.jsonl,field=content,weight=1"),
                            num_samples=12, seq_len=32, seed=0)
    assert torch.equal(cs.input_ids, again.input_ids)


def test_prepare_writes_a_token_file_stages_take_back(qwen, sources, tmp_path, cli_run):
    from safetensors import safe_open

    out = tmp_path / "calib.safetensors"
    r = cli_run("calib", "prepare", QWEN, "--calib", f"{sources}/docs.jsonl,field=content", "--num-samples", 10,
                "--seq-len", 40, "--seed", 4, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "calib.safetensors.json").read_text())
    assert side["format"] == "moepress-calib" and side["num_samples"] == 10 and side["seq_len"] == 40
    res = json.loads(r.stdout)  # --json: the sidecar's description, where it is, and whether the cache served it
    assert {k: res[k] for k in side} == side and res["output"] == res["path"] == str(out)
    assert isinstance(res["cached"], bool) and res["memory"]["host_rss_peak_bytes"] > 0
    assert side["tokenizer"]["sha256"] and side["sources"][0]["sha256"]
    with safe_open(str(out), "pt") as f:
        ids = f.get_tensor("input_ids")
    want = calibration_set(qwen, (f"{sources}/docs.jsonl,field=content",), num_samples=10, seq_len=40, seed=4)
    assert torch.equal(ids.long(), want.input_ids)
    # a stage passes the token file as a source and gets exactly these samples
    back = calibration_batches(qwen, (str(out),), num_samples=10, seq_len=40, batch_size=10)
    assert torch.equal(back[0], want.input_ids)
    # .pt variant, loadable with torch.load(weights_only=True)
    pt = tmp_path / "calib.pt"
    assert cli_run("calib", "prepare", QWEN, "--num-samples", 4, "--seq-len", 40, "-o", pt).exit_code == 0
    assert torch.load(pt, weights_only=True)["input_ids"].shape == (4, 40)
    # existing output without --force
    assert_one_line_error(cli_run("calib", "prepare", QWEN, "-o", pt), "exists")
    # the token file must match the seq-len asked and the model's tokenizer; the line names both options the
    # file needs (the default --num-samples 64 was refused only after --seq-len was mended)
    assert_one_line_error(cli_run("calib", "prepare", QWEN, "--calib", out, "--seq-len", 64, "-o",
                                  tmp_path / "x.pt"), "calib.safetensors", "--seq-len 64",
                          "--seq-len 40 --num-samples 10")


def test_prepare_says_what_it_wrote_and_when_the_cache_served_it(qwen, tmp_path, cli_run):
    r = cli_run("calib", "prepare", QWEN, "--num-samples", 2, "--seq-len", 8, "--seed", 11, "-o", tmp_path / "a.pt")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"{tmp_path / 'a.pt'}: 2 samples x 8 tokens (16 tokens), seed 11, tokenizer ")
    assert "(from the cache)" not in r.stdout
    r = cli_run("calib", "prepare", QWEN, "--num-samples", 2, "--seq-len", 8, "--seed", 11, "-o", tmp_path / "b.pt")
    assert r.exit_code == 0 and "(from the cache)" in r.stdout, r.output
    assert torch.equal(torch.load(tmp_path / "a.pt")["input_ids"], torch.load(tmp_path / "b.pt")["input_ids"])


@pytest.mark.parametrize("make,name,force,needles", [
    (None, "c.bin", False, ["-o c.bin", "expected a file name ending in .safetensors or .pt"]),
    ("c.pt.json", "c.pt", False, ["c.pt.json: exists", "--force"]),  # the description beside it
    ("c.pt/", "c.pt", True, ["c.pt: is a directory", "expected a file name"]),
])
def test_prepare_refuses_an_output_it_cannot_write_before_reading_data(tmp_path, cli_run, monkeypatch, make, name,
                                                                       force, needles):
    monkeypatch.chdir(tmp_path)
    if make:
        (tmp_path / make).mkdir() if make.endswith("/") else (tmp_path / make).write_text("{}")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_one_line_error(cli_run("calib", "prepare", QWEN, "-o", name, *(["--force"] if force else [])), *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ---- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,needles", [
    ("empty.txt", ["empty.txt", "empty file"]),
    ("nofield.jsonl", ["nofield.jsonl:1", "no 'text' or 'messages' field", "body"]),
    ("nofield.jsonl,field=text", ["nofield.jsonl:1", "no field 'text'"]),
    ("latin1.txt", ["latin1.txt", "not UTF-8"]),
    ("zeros.txt", ["zeros.txt", "not text (a NUL byte at offset 0)"]),
    ("short.txt", ["short.txt", "fewer than one sample"]),
    ("data.xyz", ["data.xyz", "unknown source type"]),
    ("docs.jsonl,colour=red", ["unknown option"]),
    ("docs.jsonl@0", ["positive"]),
    ("docs.jsonl@-1", ["weight '-1'", "positive"]),  # was "no such file or directory"
    ("docs.jsonl@nan", ["weight 'nan'", "positive"]),
    ("missing.txt", ["missing.txt", "no such file"]),
    ("docs_ds,split=train", ["docs_ds", "a single dataset has no splits (split=train given)"]),
    ("dd,split=validation", ["dd", "pick a split with ,split=NAME (splits: train, test)"]),
])
def test_bad_sources_one_line_exit_2(spec, needles, sources, tmp_path, cli_run):
    r = cli_run("calib", "prepare", QWEN, "--calib", f"{sources}/{spec}", "--seq-len", 64, "--num-samples", 2,
                "-o", tmp_path / "c.safetensors")
    assert_one_line_error(r, *needles)
    assert not (tmp_path / "c.safetensors").exists()


def test_hub_dataset_without_network_is_one_line(qwen, tmp_path, cli_run, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = cli_run("calib", "prepare", QWEN, "--calib", "allenai/c4,config=en", "-o", tmp_path / "c.pt")
    assert_one_line_error(r, "allenai/c4", "Hugging Face Hub", "save_to_disk")


def test_parquet_without_pyarrow_is_one_line(qwen, tmp_path, cli_run, monkeypatch):
    """pyarrow comes with the [data] extra only: a Parquet source without it was a ModuleNotFoundError."""
    import sys

    (tmp_path / "x.parquet").write_text("hi")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    r = cli_run("calib", "prepare", QWEN, "--calib", tmp_path / "x.parquet", "-o", tmp_path / "c.pt")
    assert_one_line_error(r, "x.parquet", "pyarrow", "moepress[data]")


def test_model_that_is_a_file_or_has_a_broken_config_is_one_line(qwen, tmp_path, cli_run):
    """A file as MODEL was reported as "no tokenizer found"; a config.json that is not an object was ignored
    (and with it the --seq-len check against max_position_embeddings)."""
    (tmp_path / "f.txt").write_text("x")
    assert_one_line_error(cli_run("calib", "prepare", tmp_path / "f.txt", "-o", tmp_path / "c.pt"),
                          "f.txt", "expected a model directory, got a file")
    d = tmp_path / "d"
    d.mkdir()
    for p in qwen.iterdir():
        if p.name.startswith("tokenizer"):
            (d / p.name).symlink_to(p)
    (d / "config.json").write_text("[1]")
    assert_one_line_error(cli_run("calib", "prepare", d, "-o", tmp_path / "c.pt"), "config.json",
                          "expected a JSON object")


def test_missing_tokenizer_and_remote_code(qwen, tmp_path, cli_run):
    bare = tmp_path / "bare"
    bare.mkdir()
    for p in qwen.iterdir():
        if not p.name.startswith("tokenizer"):
            (bare / p.name).symlink_to(p)
    assert_one_line_error(cli_run("calib", "prepare", bare, "-o", tmp_path / "c.pt"), "bare", "no tokenizer")
    assert_one_line_error(cli_run("calib", "stats", bare, "-o", tmp_path / "s"), "no tokenizer")
    # check's held-out text goes through load_tokenizer: transformers built an empty Qwen2 tokenizer from
    # config.json ("text has 0 tokens") or failed in five lines (Mixtral, DeepSeek)
    copy = shutil.copytree(qwen, tmp_path / "untokenized", ignore=shutil.ignore_patterns("tokenizer*"))
    (copy / "chat_template.jinja").write_text("{{ messages }}")  # a template alone holds no vocabulary
    assert_one_line_error(cli_run("check", qwen, "--reference", copy), "untokenized", "no tokenizer")
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    assert_one_line_error(cli_run("check", qwen, "--reference", qwen, "--kind", "transformers", "--data", short, "-q"),
                          "short.txt", "fewer than one sample")
    # a tokenizer shipped as Python code loads only with --trust-remote-code
    remote = tmp_path / "remote"
    shutil.copytree(qwen, remote)
    cfg = json.loads((remote / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "tokenization_tiny.TinyTokenizer"]}
    cfg["tokenizer_class"] = "TinyTokenizer"  # a class transformers does not have
    (remote / "tokenizer_config.json").write_text(json.dumps(cfg))
    (remote / "tokenization_tiny.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\nclass TinyTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n")
    args = ("calib", "prepare", remote, "--num-samples", 4, "--seq-len", 32, "-o")
    assert_one_line_error(cli_run(*args, tmp_path / "r.pt"), "--trust-remote-code")
    r = cli_run(*args, tmp_path / "r.pt", "--trust-remote-code")
    assert r.exit_code == 0, r.output
    want = calibration_set(qwen, num_samples=4, seq_len=32, cache=False).input_ids
    assert torch.equal(torch.load(tmp_path / "r.pt", weights_only=True)["input_ids"].long(), want)
    assert type(load_tokenizer(remote, trust_remote_code=True)).__name__ == "TinyTokenizer"


def test_kimi_config_with_a_tokenizer_json_tokenizes_like_deepseek(tmp_path, cli_run):
    """Kimi K2's config.json (model_type kimi_k2, its yarn rope_scaling) beside a tokenizer.json:
    transformers cannot build kimi_k2's config class, read it as a bare config and failed in its
    rope validation with a traceback; calibration and check's held-out text tokenize as DeepSeek-V3."""
    src = models.path("tiny-deepseek-v3")
    kimi = shutil.copytree(src, tmp_path / "kimi")
    cfg = json.loads((kimi / "config.json").read_text())
    theta = cfg.pop("rope_parameters")["rope_theta"]
    cfg.update(model_type="kimi_k2", rope_theta=theta, max_position_embeddings=32 * 4096,
               rope_scaling={"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                             "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})
    (kimi / "config.json").write_text(json.dumps(cfg))
    text = "def f(x):\n    return x + 1  # Kimi"
    assert load_tokenizer(kimi)(text)["input_ids"] == load_tokenizer(src)(text)["input_ids"]
    want = calibration_set(src, num_samples=4, seq_len=32, cache=False).input_ids
    assert torch.equal(calibration_set(kimi, num_samples=4, seq_len=32, cache=False).input_ids, want)
    copy = shutil.copytree(kimi, tmp_path / "kimi-copy")  # a candidate of the same config (its rope, too)
    r = cli_run("check", copy, "--reference", kimi, "--seq-len", 32, "--max-samples", 2)  # kimi's text
    assert isinstance(r.exception, SystemExit | None) and "perplexity" in r.output, r.output


# ---- observers ---------------------------------------------------------------------------------

def test_layer_routing_coselect_merge_and_serialisation(tmp_path):
    g = torch.Generator().manual_seed(0)
    e, k = 12, 3

    def feed(lr, t):
        idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
        w = torch.rand(t, k, generator=g)
        lr.on_route(None, torch.zeros(t, 4), None, w, idx)
        for x in torch.unique(idx).tolist():
            tok_, slot = torch.where(idx == x)
            lr.on_expert(None, x, tok_, slot, w[tok_, slot], None, torch.rand(tok_.numel(), 4, generator=g))
        return idx

    a, b, both = LayerRouting(e, k), LayerRouting(e, k), LayerRouting(e, k)
    ia = feed(a, 50)
    ib = feed(b, 30)
    hit = torch.zeros(80, e, dtype=torch.int64).scatter_(1, torch.cat([ia, ib]), 1)
    both = LayerRouting(e, k)
    both.merge(a)
    both.merge(b)
    assert torch.equal(both.coselect, hit.T @ hit)
    assert torch.equal(both.counts, hit.sum(0)) and both.tokens == 80
    assert both.gate_sum.dtype == torch.float64 and both.counts.dtype == torch.int64
    torch.testing.assert_close(both.reap, torch.where(both.counts > 0, both.reap_sum / both.counts.clamp(min=1), 0.))
    rs = RoutingStats({3: both})
    rs.save(tmp_path / "r.safetensors")
    back = RoutingStats.load(tmp_path / "r.safetensors")
    # the same bytes in every process: metadata keys in a fixed order (safetensors' save_file ordered them by a
    # hash seeded per process, so two runs of calib stats wrote different files for the same statistics)
    assert (tmp_path / "r.safetensors").read_bytes()[8:].startswith(b'{"__metadata__":{"format":"moepress-routing",')
    for f in ("counts", "gate_sum", "norm_sum", "reap_sum", "coselect"):
        assert torch.equal(getattr(back.layers[3], f), getattr(both, f))
    assert RoutingStats.from_dict(json.loads(json.dumps(rs.to_dict()))).layers[3].tokens == 80
    with pytest.raises(ValueError):
        both.merge(LayerRouting(e + 1, k))


def test_input_absmax_merge_and_save(tmp_path):
    lin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    obs1, obs2 = InputAbsMax(), InputAbsMax()
    x1, x2 = torch.randn(5, 4), torch.randn(7, 4) * 3
    obs1.attach(lin)
    lin(x1)
    obs1.detach()
    obs2.attach(lin)
    lin(x2)
    obs2.detach()
    obs1.merge(obs2)
    torch.testing.assert_close(obs1.amax["0"], torch.cat([x1, x2]).abs().amax(0), rtol=0, atol=0)
    obs1.save(tmp_path / "a.safetensors", prefix="model.layers.0.")
    back = InputAbsMax.load(tmp_path / "a.safetensors", prefix="model.layers.0.")
    assert set(back.amax) == {"0", "1"} and torch.equal(back.amax["1"], obs1.amax["1"])


# ---- moepress calib stats ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def stats_run(tmp_path_factory):
    from click.testing import CliRunner

    from moepress.cli import cli

    out = tmp_path_factory.mktemp("stats") / "out"
    r = CliRunner().invoke(cli, ["calib", "stats", QWEN, "--num-samples", "2", "--seq-len", "8", "--batch-size", "1",
                                 "--absmax", "-o", str(out), "--json"], catch_exceptions=False)
    return r, out


def test_stats_outputs(stats_run, qwen):
    import matplotlib.image

    r, out = stats_run
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    doc = json.loads((out / "stats.json").read_text())
    assert doc["family"] == "qwen3_moe" and doc["calibration"]["tokens"] == 16 == summary["tokens"]
    routing = RoutingStats.load(out / "routing.safetensors")
    for i, layer in doc["layers"].items():
        lr = routing.layers[int(i)]
        assert layer["counts"] == lr.counts.tolist() and layer["tokens"] == 16
        never = [e for e, c in enumerate(layer["counts"]) if c == 0]
        assert summary["layers"][i]["never_routed"] == never == doc["summary"]["layers"][i]["never_routed"]
        assert abs(sum(layer["share"]) - 1) < 1e-12
    assert summary["never_routed_total"] > 0  # 16 tokens x top-4 over 16 experts leaves some idle
    img = matplotlib.image.imread(out / "heatmap.png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    for i, layer in doc["layers"].items():
        amax = InputAbsMax.load(out / "input_absmax.safetensors", prefix=f"model.layers.{i}.").amax
        assert amax["self_attn.q_proj"].shape == (128,) and amax["mlp.experts.0.gate_proj"].dtype == torch.float32 \
            if layer["counts"][0] else "mlp.experts.0.gate_proj" not in amax
        # an expert has input ranges exactly when it received tokens
        seen = {int(k.split(".")[2]) for k in amax if k.startswith("mlp.experts.") and k.endswith("down_proj")}
        assert seen == {e for e, c in enumerate(layer["counts"]) if c}
    manifest = json.loads((out / "moepress-manifest.json").read_text())
    assert manifest["stage"] == "calib-stats" and "heatmap.png" in manifest["files"]
    # progress: one JSON event per layer on stderr
    events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert sum(ev["event"] == "progress" for ev in events) == 4


def test_stats_terminal_summary(qwen, tmp_path, cli_run):
    r = cli_run("calib", "stats", qwen, "--num-samples", "4", "--seq-len", "32", "-o", tmp_path / "s", "--quiet")
    assert r.exit_code == 0, r.output
    assert "max/mean" in r.stdout and "never routed" in r.stdout and r.stderr == ""
    assert (tmp_path / "s" / "summary.txt").read_text().strip() in r.stdout
    assert_one_line_error(cli_run("calib", "stats", qwen, "-o", tmp_path / "s"), "not empty")


def test_absmax_beside_routing_stats_counts_only_routed_inputs():
    """REAP's reference routing runs a DeepSeek expert on tokens the family's router did not send it;
    the input absmax observed beside it counted those calls (experts with no routed token got entries,
    channels up to 800x their true max). Recomputed here with the absmax observer alone."""
    from moepress.calib.observers import InputAbsMax
    from moepress.calib.stats import collect
    from moepress.compress.stream import StreamedModel

    p = models.path("tiny-deepseek-v3")
    b = [torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))]
    _, amax, _ = collect(p, b, absmax=True)
    sm = StreamedModel(p)
    hs, alone = sm.embed(b), {}
    for i, layer in sm.layers():
        o = InputAbsMax()
        o.attach(layer)
        hs = sm.run_layer(layer, hs)
        o.detach()
        alone.update(o.state_dict(prefix=sm.adapter.layer_prefix(i)))
    assert set(amax) == set(alone) and all(torch.equal(amax[k], alone[k]) for k in alone)


def test_a_source_edited_keeping_size_and_mtime_is_not_served_from_the_cache(qwen, tmp_path):
    """The hash memo trusted path, size and mtime: a same-size edit with `touch -r` (or cp -p, rsync -a)
    returned the old samples, and an edited --calib file did not change quantize's resume key."""
    from moepress.calib.data import source_hashes

    text = (models.path(QWEN).parent.parent / "calib" / "data" / "calib.txt").read_text()[:20000]
    src = tmp_path / "c.txt"
    src.write_text(text)
    st = src.stat()
    a = calibration_set(qwen, (str(src),), num_samples=4, seq_len=32)
    h = source_hashes((str(src),))[str(src)]
    src.write_text(text.swapcase())  # same size
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch -r: the old mtime
    b = calibration_set(qwen, (str(src),), num_samples=4, seq_len=32)
    assert not b.cached and not torch.equal(a.input_ids, b.input_ids)
    assert source_hashes((str(src),))[str(src)] != h


def test_tokenizer_class_chosen_by_model_type_is_part_of_the_key(qwen, tmp_path):
    """Without tokenizer_class, transformers picks the tokenizer by config.json's model_type (another
    normaliser, other ids); the fingerprint held only the tokenizer's files, so two such models shared
    cached samples."""
    from moepress.calib.data import tokenizer_fingerprint

    fps = []
    for mt in ("qwen3_moe", "llama"):
        d = tmp_path / mt
        d.mkdir()
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(qwen / f, d / f)
        tc = json.loads((d / "tokenizer_config.json").read_text())
        tc.pop("tokenizer_class", None)
        (d / "tokenizer_config.json").write_text(json.dumps(tc))
        (d / "config.json").write_text(json.dumps({"model_type": mt}))
        fps.append(tokenizer_fingerprint(d)["sha256"])
    assert fps[0] != fps[1]


def test_a_cache_hit_describes_this_request(qwen, tmp_path):
    """The cached set's description named the first caller's source path and model."""
    text = (models.path(QWEN).parent.parent / "calib" / "data" / "calib.txt").read_text()[:20000]
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "c.txt").write_text(text)
    calibration_set(qwen, (str(tmp_path / "one" / "c.txt"),), num_samples=4, seq_len=32, seed=7)
    b = calibration_set(qwen, (str(tmp_path / "two" / "c.txt"),), num_samples=4, seq_len=32, seed=7)
    assert b.cached and b.meta["sources"][0]["spec"] == str(tmp_path / "two" / "c.txt")
    assert b.meta["tokenizer"]["model"] == str(qwen)


@pytest.mark.parametrize("damage", [b"\xff\xfe", b"[]", b'{"/x": []}'])
def test_a_damaged_hash_memo_is_hashed_again(qwen, _cache_dir, damage):
    """Bytes that are not UTF-8, or JSON of another shape, in the memo gave a traceback in every stage."""
    (_cache_dir / "calib").mkdir(parents=True, exist_ok=True)
    (_cache_dir / "calib" / "file-hashes.json").write_bytes(damage)
    assert calibration_set(qwen, num_samples=4, seq_len=32, seed=3).input_ids.shape == (4, 32)


def test_no_home_directory_runs_without_a_cache(monkeypatch):
    """No HOME and no passwd entry: Path.home() raised a RuntimeError traceback."""
    from moepress.calib import cache

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("MOEPRESS_CACHE", raising=False)
    monkeypatch.setattr(cache.Path, "home", staticmethod(no_home))
    assert cache.cache_root() is None


@pytest.fixture(scope="module")
def quiet_stats_run(tmp_path_factory):
    """`calib stats` with its defaults but a 2 x 8 token calibration set, --quiet --json."""
    from click.testing import CliRunner

    from moepress.cli import cli

    out = tmp_path_factory.mktemp("quiet-stats") / "s"
    r = CliRunner().invoke(cli, ["calib", "stats", QWEN, "--num-samples", "2", "--seq-len", "8", "-o", str(out),
                                 "--quiet", "--json"], catch_exceptions=False)
    return r, out


def test_quiet_wins_over_json_events(quiet_stats_run):
    """``--quiet --json``: the JSON result on stdout and no progress at all (--quiet says "no progress output")."""
    r, out = quiet_stats_run
    assert r.exit_code == 0 and r.stderr == "" and json.loads(r.stdout)["output"] == str(out), r.output


def test_stats_defaults_reach_its_manifest_and_result(quiet_stats_run):
    """The options' documented defaults (--help) are what the run used and recorded; the result counts the
    calibration tokens (2 samples x 8) and says the rare threshold it applied."""
    r, out = quiet_stats_run
    res = json.loads(r.stdout)
    assert (res["tokens"], res["world_size"], res["rare_threshold"]) == (16, 1, 0.1)
    manifest = json.loads((out / "moepress-manifest.json").read_text())
    assert manifest["config"] == {"calib": [], "num_samples": 2, "seq_len": 8, "seed": 0, "batch_size": 8,
                                  "rare": 0.1, "absmax": False, "dtype": "float32"}
    assert manifest["inputs"]["calibration_tokens"] == 16 and not (out / "input_absmax.safetensors").exists()


def test_a_heatmap_cell_of_a_routed_expert_never_reads_zero():
    """One routed slot in 32,768 (0.003%) printed ".00", read as never routed (a grey cell with an x)."""
    from moepress.calib.heatmap import cell_label

    assert cell_label(100 / 32768) == "<.01" and cell_label(0.004999) == "<.01"
    assert [cell_label(v) for v in (0.005, 0.5, 1.0, 12.4)] == [".01", ".50", "1.0", "12"]


@pytest.mark.parametrize("rare", ["nan", "-0.1", "1.5"])
def test_rare_outside_zero_to_one_is_one_line(cli_run, tmp_path, rare):
    """click's FloatRange let NaN through (every comparison with it is false): stats.json held NaN (not JSON) and
    no expert was ever rare."""
    r = cli_run("calib", "stats", "tiny-qwen3-moe", "--rare", rare, "-o", tmp_path / "s")
    assert_one_line_error(r, "--rare", rare)
    assert not (tmp_path / "s").exists()


def test_an_output_over_a_calibration_source_is_refused(cli_run, tmp_path):
    """calib stats -o inside a --calib folder: its summary.txt was the next run's calibration text; calib prepare
    -o the --calib token file (with --force) replaced its own input, its sidecar naming bytes that no longer exist."""
    folder = tmp_path / "texts"
    folder.mkdir()
    shutil.copy(BUNDLED_CALIB, folder / "a.txt")
    r = cli_run("calib", "stats", "tiny-mixtral", "--calib", folder, "-o", folder / "st")
    assert_one_line_error(r, f"-o {folder / 'st'}", "inside the input")
    tok = tmp_path / "tok.safetensors"
    r = cli_run("calib", "prepare", "tiny-mixtral", "--num-samples", "4", "--seq-len", "16", "-o", tok)
    assert r.exit_code == 0, r.output
    before = tok.read_bytes()
    r = cli_run("calib", "prepare", "tiny-mixtral", "--calib", tok, "--num-samples", "2", "--seq-len", "16", "-o", tok,
                "--force")
    assert_one_line_error(r, f"-o {tok}", "is the input")
    assert tok.read_bytes() == before and not (folder / "st").exists()


@pytest.mark.parametrize("stage", [["quantize", "--format", "fp8"], ["prune", "--ratio", "0.25"]])
def test_a_stage_output_over_its_calibration_file_is_refused_and_leaves_it(cli_run, tmp_path, stage):
    """quantize / prune -o a folder holding the --calib file, with --force: the writer cleared the folder (the
    calibration file with it) and the run went on, its manifest naming a file that no longer existed."""
    out = tmp_path / "u"
    out.mkdir()
    shutil.copy(BUNDLED_CALIB, out / "my.txt")
    (out / "notes.txt").write_text("x")
    r = cli_run(stage[0], "tiny-qwen3-moe", *stage[1:], "--calib", out / "my.txt", "--num-samples", "4",
                "--seq-len", "32", "-o", out, "--force", "-q")
    assert_one_line_error(r, str(out), f"contains the --calib source {out / 'my.txt'}")
    assert sorted(p.name for p in out.iterdir()) == ["my.txt", "notes.txt"]


def test_a_run_directory_inside_its_calibration_folder_is_refused_before_any_stage(cli_run, tmp_path):
    """`run -o` inside a calib.sources folder: refused once quantize had started, naming neither the source nor
    the recipe's key; now before the run directory is made. A Hub source of a name that is also a local folder is
    no local input."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(BUNDLED_CALIB, data / "calib.txt")
    rec = tmp_path / "r.yaml"
    rec.write_text(f"model: tiny-qwen3-moe\ncalib: {{sources: [{data}], num_samples: 4, seq_len: 32}}\n"
                   "quantize: {format: fp8}\ncheck: null\n")
    r = cli_run("run", rec, "-o", data / "out")
    assert_one_line_error(r, f"{data / 'out'}: the output is inside the calib.sources source {data}")
    assert not (data / "out").exists()
    from moepress.calib.sources import local_paths

    (tmp_path / "org" / "ds").mkdir(parents=True)
    assert local_paths([f"hf:{tmp_path / 'org' / 'ds'}"]) == []


@pytest.mark.parametrize("spec", ["bundled@-1", "bundled@nan", "hf:org/data@inf"])
def test_a_bad_weight_of_a_named_source_names_the_weight(spec, tmp_path, cli_run):
    """The bundled text and a Hub dataset are no paths: a bad weight on them read "no such file or directory"."""
    r = cli_run("calib", "prepare", QWEN, "--calib", spec, "--seq-len", 16, "--num-samples", 2,
                "-o", tmp_path / "c.safetensors")
    assert_one_line_error(r, f"--calib {spec}", f"weight '{spec.rpartition('@')[2]}'", "positive number")
