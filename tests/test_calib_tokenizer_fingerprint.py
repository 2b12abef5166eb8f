"""The tokenizer fingerprint that keys the calibration cache (``calib/tokenizer.py``): each file's bytes
(hashlib as the oracle; a same-size edit changes it), the library versions, ``tokenizer_config.json``'s
chat template (a stale hit would serve the old template's tokens; transformers' own ``apply_chat_template``
as the oracle), a ``chat_template.jinja`` file, ``special_tokens_map.json`` and remote tokenizer code; and an
``auto_map`` that names no tokenizer class loads without ``--trust-remote-code``, as transformers does."""

import hashlib
import json
import shutil

from transformers import AutoTokenizer

from moepress import models
from moepress.calib.data import calibration_set
from moepress.calib.tokenizer import load_tokenizer, tokenizer_fingerprint

QWEN = models.path("tiny-qwen3-moe")
TEXT = (QWEN.parent.parent / "calib" / "data" / "eval.txt").read_text()


def test_fingerprint_hashes_each_files_bytes(tmp_path):
    d = shutil.copytree(QWEN, tmp_path / "m")
    fp = tokenizer_fingerprint(d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert fp["files"][name] == hashlib.sha256((d / name).read_bytes()).hexdigest()
    data = bytearray((d / "tokenizer.json").read_bytes())  # same size, one byte of a vocabulary piece changed
    i = data.index(b'"vocab"') + 40
    while not chr(data[i]).isalpha():
        i += 1
    data[i] = ord("q") if data[i] != ord("q") else ord("z")
    (d / "tokenizer.json").write_bytes(bytes(data))
    assert tokenizer_fingerprint(d)["sha256"] != fp["sha256"]


def test_fingerprint_follows_the_library_versions(monkeypatch):
    import tokenizers
    import transformers

    base = tokenizer_fingerprint(QWEN)["sha256"]
    monkeypatch.setattr(tokenizers, "__version__", "0.0.1")
    assert tokenizer_fingerprint(QWEN)["sha256"] != base
    monkeypatch.undo()
    monkeypatch.setattr(transformers, "__version__", "0.0.1")
    assert tokenizer_fingerprint(QWEN)["sha256"] != base


def _chat_source(tmp_path):
    docs = [TEXT[i * 500:(i + 1) * 500] for i in range(8)]
    msgs = [[{"role": "user", "content": f"Explain {k}."}, {"role": "assistant", "content": t}]
            for k, t in enumerate(docs)]
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps({"messages": m}) + "\n" for m in msgs))
    return f"{p},mode=truncate", msgs


def _want(d, msgs, seq_len):
    tok = AutoTokenizer.from_pretrained(str(d))
    return {tuple(tok(tok.apply_chat_template(m, tokenize=False), add_special_tokens=False)["input_ids"][:seq_len])
            for m in msgs}


def test_a_chat_template_edited_in_tokenizer_config_is_not_served_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))
    spec, msgs = _chat_source(tmp_path)
    calibration_set(QWEN, (spec,), num_samples=4, seq_len=24, seed=0)
    d = shutil.copytree(QWEN, tmp_path / "m")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["chat_template"] = tc["chat_template"].replace("'<|im_start|>' + message['role'] + '\\n'",
                                                      "'<|im_start|>' + message['role'] + ': '")
    assert tc["chat_template"] != json.loads((QWEN / "tokenizer_config.json").read_text())["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    cs = calibration_set(d, (spec,), num_samples=4, seq_len=24, seed=0)
    assert not cs.cached and all(tuple(r) in _want(d, msgs, 24) for r in cs.input_ids.tolist())


def test_a_chat_template_file_edit_changes_the_fingerprint(tmp_path):
    d = shutil.copytree(QWEN, tmp_path / "m")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    template = tc.pop("chat_template")
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    (d / "chat_template.jinja").write_text(template)
    a = tokenizer_fingerprint(d)["sha256"]
    (d / "chat_template.jinja").write_text(template.replace("'\\n'", "': '", 1))
    assert AutoTokenizer.from_pretrained(str(d)).chat_template != template  # transformers reads the file
    assert tokenizer_fingerprint(d)["sha256"] != a


def _tokenizer_only(tmp_path, name="m"):
    d = tmp_path / name
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(QWEN / f, d / f)
    return d


def _edit_config(d, **changes):
    tc = {**json.loads((d / "tokenizer_config.json").read_text()), **changes}
    (d / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in tc.items() if v is not None}))


def test_a_special_tokens_map_edit_changes_the_fingerprint(tmp_path):
    """Where tokenizer_config.json names no EOS, transformers takes it from special_tokens_map.json (and pack
    mode joins documents with it)."""
    d = _tokenizer_only(tmp_path)
    _edit_config(d, eos_token=None)
    eos, fps = [], []
    for tok in ("<|im_end|>", "<|im_start|>"):
        (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": tok}))
        eos.append(AutoTokenizer.from_pretrained(str(d)).eos_token_id)
        fps.append(tokenizer_fingerprint(d)["sha256"])
    assert eos[0] != eos[1] and fps[0] != fps[1]


def test_a_remote_tokenizer_code_edit_changes_the_fingerprint(tmp_path):
    d = _tokenizer_only(tmp_path)
    (d / "tokenization_tiny.py").write_text("X = 1\n")
    a = tokenizer_fingerprint(d)
    assert a["files"]["tokenization_tiny.py"] == hashlib.sha256(b"X = 1\n").hexdigest()
    (d / "tokenization_tiny.py").write_text("X = 2\n")
    assert tokenizer_fingerprint(d)["sha256"] != a["sha256"]


def test_an_auto_map_without_a_tokenizer_class_needs_no_remote_code(tmp_path):
    """auto_map naming only the model's classes (remote modeling code): transformers loads the tokenizer
    without trust_remote_code, so calibration must not ask for it."""
    d = _tokenizer_only(tmp_path)
    _edit_config(d, auto_map={"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"})
    text = TEXT[:2000]
    want = AutoTokenizer.from_pretrained(str(d))(text)["input_ids"]  # no trust_remote_code
    assert load_tokenizer(d)(text)["input_ids"] == want


def test_a_named_tokenizer_class_keys_without_the_model_type(tmp_path):
    """tokenizer_config.json names its class: transformers tokenizes alike whatever config.json's model_type,
    so a checkpoint of another family with this tokenizer shares its cached samples."""
    fps, ids = [], []
    for mt in ("qwen3_moe", "mixtral"):
        d = _tokenizer_only(tmp_path, mt)
        (d / "config.json").write_text(json.dumps({"model_type": mt}))
        ids.append(AutoTokenizer.from_pretrained(str(d))(TEXT[:2000])["input_ids"])
        fps.append(tokenizer_fingerprint(d)["sha256"])
    assert ids[0] == ids[1] and fps[0] == fps[1]
