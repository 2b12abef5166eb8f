"""Issue 19: faults a hostile or careless user can cause give one line, exit 2, and leave nothing behind."""

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import forkserver
from helpers import assert_one_line_error as _one_line
from moepress import models

# ---- issue 19 case 7: index paths stay inside the model directory; errors never echo file bytes ----

def _f78_copy(tmp_path, name="tiny-qwen3-moe"):
    import shutil
    from pathlib import Path

    from moepress import models

    return Path(shutil.copytree(models.path(name), tmp_path / "m"))


def _f78_shard_of(ck, name: str = "lm_head.weight"):
    import json

    return ck / json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"][name]


def _f78_point_shard(ck, target: str):
    """Point every weight_map entry of the shard holding lm_head.weight at ``target``; returns that shard's path."""
    import json

    idx = ck / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    shard = _f78_shard_of(ck)
    d["weight_map"] = {n: (target if f == shard.name else f) for n, f in d["weight_map"].items()}
    idx.write_text(json.dumps(d))
    return shard


def test_index_entry_parent_dir_refused(tmp_path, cli_run):
    import shutil

    ck = _f78_copy(tmp_path)
    shard = _f78_point_shard(ck, "../x.safetensors")
    shutil.copy(shard, tmp_path / "x.safetensors")  # a valid shard, but outside the model
    _one_line(cli_run("inspect", ck, "--no-targets"), "model.safetensors.index.json", "lm_head.weight",
                  "../x.safetensors")


def test_index_entry_absolute_path_refused(tmp_path, cli_run):
    ck = _f78_copy(tmp_path)
    _f78_point_shard(ck, "/etc/passwd")
    _one_line(cli_run("inspect", ck, "--no-targets"), "model.safetensors.index.json", "lm_head.weight",
                  "/etc/passwd")


def test_index_symlink_out_of_directory_refused(tmp_path, cli_run):
    ck = _f78_copy(tmp_path)
    shard = _f78_shard_of(ck)
    outside = tmp_path / "outside.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)  # a valid shard, but not one of the model's files
    line = _one_line(cli_run("quantize", ck, "--format", "fp8-block", "-o", tmp_path / "q"),
                         "model.safetensors.index.json", "lm_head.weight", str(outside), "outside the model directory")
    assert "resolves to" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "outside.safetensors"]
    # a single-file checkpoint's model.safetensors is held to the same rule
    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text((ck / "config.json").read_text())
    (single / "model.safetensors").symlink_to(outside)
    _one_line(cli_run("inspect", single, "--no-targets"), "model.safetensors", "outside the model directory")


def test_a_shard_in_a_symlink_loop_is_one_line(tmp_path, cli_run):
    """pathlib raises RuntimeError (not OSError) on a symlink loop, which was a traceback."""
    ck = _f78_copy(tmp_path)
    shard = _f78_shard_of(ck)
    shard.unlink()
    shard.symlink_to(ck / "loopA")
    (ck / "loopA").symlink_to(ck / "loopB")
    (ck / "loopB").symlink_to(ck / "loopA")
    _one_line(cli_run("quantize", ck, "--format", "fp8-block", "-o", tmp_path / "q"), str(shard), "cannot be resolved")
    assert not (tmp_path / "q").exists()


def test_index_entry_text_file_not_echoed(tmp_path, cli_run):
    import struct

    ck = _f78_copy(tmp_path)
    secret = "qz7w:x:0:0:s3cr3t-token-1234:/home/qz7w:/bin/sh\n"
    (ck / "notes.txt").write_text(secret)
    _f78_point_shard(ck, "notes.txt")
    (n,) = struct.unpack("<Q", secret[:8].encode())
    leaks = (secret[:4], "s3cr3t", str(n), hex(n))
    line = _one_line(cli_run("inspect", ck, "--no-targets"), "notes.txt", "not a safetensors file")
    assert not any(leak in line for leak in leaks), line
    # the same text as a single-file checkpoint
    (ck / "model.safetensors.index.json").unlink()
    for f in ck.glob("model-*.safetensors"):
        f.unlink()
    (ck / "model.safetensors").write_text(secret)
    line = _one_line(cli_run("inspect", ck, "--no-targets"), "model.safetensors", "not a safetensors file")
    assert not any(leak in line for leak in leaks), line


def test_calib_readers_do_not_echo_file_bytes(tmp_path):
    import hashlib
    import json

    import pytest

    from moepress.calib.cache import FORMAT, VERSION, load_token_file
    from moepress.calib.sources import sidecar_path
    from moepress.calib.sources.documents import read_utf8
    from moepress.errors import MoepressError

    text = b"qz7w:x:0:0:s3cr3t\n"
    for name in ("t.pt", "t.safetensors"):
        tok = tmp_path / name
        tok.write_bytes(text)
        sidecar_path(tok).write_text(json.dumps({"format": FORMAT, "version": VERSION,
                                                 "file": {"sha256": hashlib.sha256(text).hexdigest()}}))
        with pytest.raises(MoepressError, match="cannot read token file") as e:
            load_token_file(tok)
        assert "qz7w" not in str(e.value) and "'q'" not in str(e.value), e.value
    (tmp_path / "b.txt").write_bytes(b"\xfe" + text)
    with pytest.raises(MoepressError, match="not UTF-8") as e:
        read_utf8(tmp_path / "b.txt")
    assert "0xfe" not in str(e.value) and "qz7w" not in str(e.value), e.value


# ---- issue 19 case 8: config sanity (top-k, tensor shapes) before any work ----

def _f78_top_k_over_experts(tmp_path):
    import json

    ck = _f78_copy(tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["num_experts_per_tok"] = cfg["num_local_experts"] + 4
    (ck / "config.json").write_text(json.dumps(cfg))
    return ck


def test_top_k_over_experts_inspect(tmp_path, cli_run):
    ck = _f78_top_k_over_experts(tmp_path)
    _one_line(cli_run("inspect", ck, "--no-targets"), "config.json", "num_experts_per_tok=20",
                  "num_local_experts=16")


def test_top_k_over_experts_quantize_calibrated(tmp_path, cli_run):
    ck = _f78_top_k_over_experts(tmp_path)
    _one_line(cli_run("quantize", ck, "--format", "fp8", "--num-samples", 4, "--seq-len", 32,
                          "-o", tmp_path / "q"), "config.json", "num_experts_per_tok=20", "num_local_experts=16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_top_k_over_experts_prune(tmp_path, cli_run):
    ck = _f78_top_k_over_experts(tmp_path)
    _one_line(cli_run("prune", ck, "--ratio", 0.25, "--num-samples", 4, "--seq-len", 32, "-o", tmp_path / "p"),
                  "config.json", "num_experts_per_tok=20", "num_local_experts=16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


F78_BAD = "model.layers.1.block_sparse_moe.experts.1.w2.weight"  # tiny-mixtral's down projection, [128, 256]


def _f78_misshaped(tmp_path):
    """A copy of tiny-mixtral with one expert's down projection stored transposed."""
    from safetensors.torch import load_file, save_file

    ck = _f78_copy(tmp_path, "tiny-mixtral")
    shard = _f78_shard_of(ck, F78_BAD)
    tensors = load_file(shard)
    tensors[F78_BAD] = tensors[F78_BAD].t().contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    return ck


def _f78_refused_misshaped(r, tmp_path):
    _one_line(r, F78_BAD, "[256, 128]", "[128, 256]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_misshaped_expert_inspect(tmp_path, cli_run):
    _f78_refused_misshaped(cli_run("inspect", _f78_misshaped(tmp_path), "--no-targets"), tmp_path)


def test_misshaped_expert_quantize_fp8_block(tmp_path, cli_run):
    ck = _f78_misshaped(tmp_path)
    _f78_refused_misshaped(cli_run("quantize", ck, "--format", "fp8-block", "-o", tmp_path / "q"), tmp_path)


def test_misshaped_expert_quantize_fp8(tmp_path, cli_run):
    ck = _f78_misshaped(tmp_path)
    _f78_refused_misshaped(cli_run("quantize", ck, "--format", "fp8", "--num-samples", 4, "--seq-len", 32,
                                   "-o", tmp_path / "q"), tmp_path)


# ---- issue 19, cases 1, 4, 5, 6, 9: resume keys, OS errors, the OUT.partial lock, outputs that overlap the input

def _outputs_model(tmp_path: Path, name: str = "tiny-qwen3-moe", dst: str = "M") -> Path:
    return Path(shutil.copytree(models.path(name), tmp_path / dst))


def _outputs_tree(d: Path) -> dict:
    """Every file under ``d`` (relative name -> sha256): what a refused run must leave unchanged."""
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _outputs_one_line(r, *needles) -> str:
    """:func:`helpers.assert_one_line_error`, and nothing else printed at all (stdout empty)."""
    line = _one_line(r, *needles)
    assert [ln for ln in r.output.splitlines() if ln.strip()] == [line], r.output
    return line


def _outputs_partial(tmp_path: Path, out: Path, model: Path, device=None, **cfg) -> dict:
    """OUT.partial as a quantize run of ``model`` with ``cfg`` (on ``device``) killed after its first shard
    leaves it."""

    import torch

    from moepress.compress.checkpoint import CheckpointWriter
    from moepress.compress.quantize import QuantConfig
    from moepress.compress.quantize.stage import quantize_resume_key

    key = quantize_resume_key(QuantConfig(**cfg), model, device and torch.device(device))
    w = CheckpointWriter(out, resume_key=key)
    w.add("model.embed_tokens.weight", torch.ones(4, 4))
    w.end_shard()
    w._lock.release()  # the kernel drops a killed process's lock
    return _outputs_tree(out.with_name(out.name + ".partial"))


def test_resume_refuses_a_calibrated_partial_started_on_another_device(cli_run, tmp_path):
    # a GPU run's layers round unlike the CPU's: finishing it on the CPU would match neither
    m, out = _outputs_model(tmp_path), tmp_path / "O"
    before = _outputs_partial(tmp_path, out, m, device="cuda", format="fp8", num_samples=4, seq_len=32)
    r = cli_run("quantize", m, "--format", "fp8", "--num-samples", "4", "--seq-len", "32", "--device", "cpu",
                "--resume", "-o", out)
    _outputs_one_line(r, "O.partial", "was started with device cuda", "cpu", "without --resume")
    assert _outputs_tree(tmp_path / "O.partial") == before and not out.exists()


def test_resume_refuses_a_partial_started_with_another_format(cli_run, tmp_path):
    m, out = _outputs_model(tmp_path), tmp_path / "O"
    before = _outputs_partial(tmp_path, out, m, format="int4-awq", num_samples=4, seq_len=32)
    r = cli_run("quantize", m, "--format", "fp8", "--resume", "-o", out)
    _outputs_one_line(r, "O.partial", "was started with format int4-awq", "fp8", "without --resume")
    assert _outputs_tree(tmp_path / "O.partial") == before and not out.exists()  # kept, untouched


def test_a_resume_refusal_names_the_option_changed_not_what_follows_from_it(cli_run, tmp_path):
    """fp8 (calibrated: its key records the device) resumed as fp8-dynamic (calibration-free: it does not) read
    "was started with device cpu and format fp8, this run asks for device none and format fp8-dynamic"."""
    m, out = _outputs_model(tmp_path), tmp_path / "O"
    _outputs_partial(tmp_path, out, m, format="fp8", num_samples=4, seq_len=32)
    r = cli_run("quantize", m, "--format", "fp8-dynamic", "--resume", "-o", out)
    line = _outputs_one_line(r, "O.partial", "was started with format fp8, this run asks for fp8-dynamic")
    assert "device" not in line


def test_resume_refuses_a_partial_of_another_model(cli_run, tmp_path):
    m, other, out = _outputs_model(tmp_path), _outputs_model(tmp_path, "tiny-mixtral", "X"), tmp_path / "O"
    before = _outputs_partial(tmp_path, out, other, format="fp8")
    r = cli_run("quantize", m, "--format", "fp8", "--resume", "-o", out)
    _outputs_one_line(r, "O.partial", "another input", "config.json")
    assert _outputs_tree(tmp_path / "O.partial") == before and not out.exists()


@pytest.mark.parametrize("change", ["tokenizer", "weights, size and mtime kept"])
def test_resume_refuses_a_partial_whose_input_changed_where_its_stamp_did_not_show(cli_run, tmp_path, change):
    """The input's identity was each shard's size and mtime plus config.json and the index: a changed tokenizer
    (it decides the calibration tokens) or weights rewritten with their size and mtime kept (`cp -p`, `touch -r`,
    `rsync -a`) resumed, and the output held layers of two runs, equal to neither."""
    import os

    m, out = _outputs_model(tmp_path), tmp_path / "O"
    before = _outputs_partial(tmp_path, out, m, format="fp8", num_samples=4, seq_len=32)
    if change == "tokenizer":
        (m / "tokenizer_config.json").write_text((m / "tokenizer_config.json").read_text().replace("}", ', "x": 1}', 1))
        named = "tokenizer_config.json"
    else:
        shard = next(iter(sorted(m.glob("*.safetensors"))))
        st = shard.stat()
        data = bytearray(shard.read_bytes())
        data[-1] ^= 1  # the last byte of the last tensor
        shard.write_bytes(bytes(data))
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (shard.stat().st_size, shard.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
        named = shard.name
    r = cli_run("quantize", m, "--format", "fp8", "--num-samples", "4", "--seq-len", "32", "--resume", "-o", out)
    _outputs_one_line(r, "O.partial", "another input", named)
    assert _outputs_tree(tmp_path / "O.partial") == before and not out.exists()


def test_resume_refuses_a_partial_without_a_key(cli_run, tmp_path):
    m, out = _outputs_model(tmp_path), tmp_path / "O"
    (tmp_path / "O.partial").mkdir()
    (tmp_path / "O.partial" / "writer-journal.json").write_text('{"shards": [], "digests": {}}')
    before = _outputs_tree(tmp_path / "O.partial")
    r = cli_run("quantize", m, "--format", "fp8", "--resume", "-o", out)
    _outputs_one_line(r, "O.partial", "no record")
    assert _outputs_tree(tmp_path / "O.partial") == before and not out.exists()


def _outputs_enospc(monkeypatch):
    """The writer's shard write fails like a full disk (os.write's OSError has no file name)."""
    from moepress.compress.checkpoint import writer

    def full(path, tensors, metadata=None):
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "write_safetensors", full)


def _outputs_nothing_left(tmp_path: Path, name: str = "O") -> None:
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(name)) == []


@pytest.mark.parametrize("args", [
    ("quantize", "tiny-qwen3-moe", "--format", "fp8"),  # calibration-free: the shard is written by a thread
    ("prune", "tiny-mixtral", "--ratio", "0.25", "--method", "frequency", "--num-samples", "2", "--seq-len", "32"),
    ("export", "tiny-qwen3-moe", "--format", "hf-fp8-block"),
], ids=["quantize", "prune", "export"])
def test_disk_full_is_one_line_naming_the_file_and_errno(cli_run, tmp_path, monkeypatch, args):
    _outputs_enospc(monkeypatch)
    r = cli_run(*args, "-o", tmp_path / "O", "--quiet")
    _outputs_one_line(r, "O.partial/shard-", "No space left on device (ENOSPC)")
    _outputs_nothing_left(tmp_path)  # the partial and its lock removed


def test_os_error_without_a_file_name_names_the_output(cli_run, tmp_path, monkeypatch):
    """An exporter that writes its own files: an OSError without a file name names -o."""
    import dataclasses

    from moepress.exporters import exporters

    def full(src, writer, cfg, progress):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setitem(exporters(), "onnx", dataclasses.replace(exporters()["onnx"], fn=full))
    r = cli_run("export", "tiny-mixtral", "--format", "onnx", "-o", tmp_path / "O")
    _outputs_one_line(r, f"{tmp_path / 'O'}: Read-only file system (EROFS)")
    _outputs_nothing_left(tmp_path)


def test_os_error_naming_two_paths_names_both(tmp_path):
    """A rename or a copy fails naming its source and its destination (OSError.filename2): the line says both."""
    from moepress.cli import os_error_line

    with pytest.raises(OSError) as e:
        os.rename(tmp_path / "gone", tmp_path / "dst")
    line = os_error_line(e.value, "OUT")
    assert line == f"{tmp_path / 'gone'} -> {tmp_path / 'dst'}: No such file or directory (ENOENT)"


def _outputs_tmpfs(tmp_path: Path) -> Path:
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    except OSError:
        pytest.skip("no mount command")
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    return mnt


@pytest.mark.parametrize("args,skip_check", [
    (("quantize", "--format", "fp8", "--num-samples", "4", "--seq-len", "32"), False),
    (("quantize", "--format", "fp8", "--num-samples", "4", "--seq-len", "32"), True),
    (("prune", "--ratio", "0.25", "--method", "frequency", "--num-samples", "2", "--seq-len", "32"), False),
    (("prune", "--ratio", "0.25", "--method", "frequency", "--num-samples", "2", "--seq-len", "32"), True),
    (("export", "--format", "hf-fp8-block"), False),
], ids=["quantize", "quantize-unchecked", "prune", "prune-unchecked", "export"])
def test_real_full_disk_3mb_tmpfs(cli_run, tmp_path, monkeypatch, args, skip_check):
    """prune and quantize refuse up front an output larger than the free space (5.5 / 7.2 MB here, against 3 MB);
    past that check (MOEPRESS_SKIP_SPACE_CHECK), and in export, the full disk itself is named."""
    from moepress.outputs import SKIP_SPACE_CHECK

    monkeypatch.delenv(SKIP_SPACE_CHECK, raising=False)
    if skip_check:
        monkeypatch.setenv(SKIP_SPACE_CHECK, "1")
    mnt = _outputs_tmpfs(tmp_path)
    try:
        r = cli_run(args[0], models.path("tiny-mixtral"), *args[1:], "-o", mnt / "O", "--quiet")
        if args[0] == "export" or skip_check:
            _outputs_one_line(r, str(mnt), "(ENOSPC)")
        else:
            _outputs_one_line(r, f"{mnt / 'O'}: the", "tensors need at least", "MB free")
        assert list(mnt.iterdir()) == []  # nothing left behind
        if args[0] != "export" and not skip_check:  # -o a link on the large disk to a folder on the small one
            (mnt / "O").mkdir()
            (tmp_path / "link").symlink_to(mnt / "O")
            r = cli_run(args[0], models.path("tiny-mixtral"), *args[1:], "-o", tmp_path / "link", "--quiet")
            _outputs_one_line(r, f"{mnt / 'O'}: the", "tensors need at least", "MB free")
            assert list((mnt / "O").iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_second_writer_on_a_locked_partial_is_refused(cli_run, tmp_path):
    from moepress.outputs import OutputLock

    partial = tmp_path / "O.partial"
    partial.mkdir()
    (partial / "shard-00000.safetensors").write_bytes(b"in progress")
    lock = OutputLock(tmp_path / "O.partial.lock", "held by the test")
    lock.acquire()  # another process writing O (flock: another open file conflicts even in this process)
    try:
        r = cli_run("quantize", "tiny-qwen3-moe", "--format", "fp8", "-o", tmp_path / "O")
        _outputs_one_line(r, "O: another moepress process is writing it", "O.partial is locked")
        assert (partial / "shard-00000.safetensors").read_bytes() == b"in progress"  # not touched
        # said by the check every torchrun rank makes before its calibration (rank 1 said "connection reset")
        from moepress.compress.checkpoint.writer import check_output
        from moepress.errors import MoepressError

        with pytest.raises(MoepressError, match="O: another moepress process is writing it"):
            check_output(tmp_path / "O")
        assert not (tmp_path / "O").exists()
    finally:
        lock.release()


def test_lock_left_by_a_killed_run_is_taken_over(cli_run, tmp_path):
    (tmp_path / "O.partial").mkdir()
    (tmp_path / "O.partial.lock").write_text("")  # a killed process's lock file: no process holds it
    r = cli_run("quantize", "tiny-qwen3-moe", "--format", "fp8", "--num-samples", "4", "--seq-len", "32",
                "-o", tmp_path / "O", "--quiet")  # calibrated, on little data: the lock is the point
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["O"]


def test_lock_is_retaken_when_its_file_is_replaced_while_locking(tmp_path, monkeypatch):
    """The holder removes the lock file between our open and our flock: we lock the new file."""
    import fcntl

    from moepress import outputs

    path = tmp_path / "O.partial.lock"
    holder = outputs.OutputLock(path, "busy")
    holder.acquire()
    real, calls = fcntl.flock, []

    def flock(fd, op):
        if not calls:
            holder.release()  # unlink + unlock: our fd names a file nobody else sees
        calls.append(fd)
        return real(fd, op)

    monkeypatch.setattr(outputs.fcntl, "flock", flock)
    mine = outputs.OutputLock(path, "busy")
    mine.acquire()
    assert len(calls) == 2 and mine.fd is not None
    assert (path.stat().st_dev, path.stat().st_ino) == (lambda s: (s.st_dev, s.st_ino))(__import__("os").fstat(mine.fd))
    mine.release()
    assert not path.exists()


@pytest.mark.parametrize("where", ["equal", "inside", "contains", "symlink"])
def test_quantize_output_overlapping_the_input_is_refused(cli_run, tmp_path, where):
    m = _outputs_model(tmp_path / "d")
    before = _outputs_tree(tmp_path)
    out = {"equal": m, "inside": m / "q", "contains": tmp_path, "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        out.symlink_to(m)
        before = _outputs_tree(tmp_path)
    r = cli_run("quantize", m, "--format", "fp8-block", "--force", "-o", out)
    _outputs_one_line(r, str(out), {"equal": "is the input", "inside": "is inside the input",
                                    "contains": "contains the input", "symlink": "is the input"}[where])
    assert _outputs_tree(tmp_path) == before  # nothing written, the input untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == (["d", "link"] if where == "symlink" else ["d"])


@pytest.mark.parametrize("args", [
    ("prune", "--ratio", "0.25", "--method", "frequency", "--num-samples", "2", "--seq-len", "32"),
    ("export", "--format", "hf-fp8-block"),
    ("calib", "stats", "--num-samples", "2", "--seq-len", "32"),
], ids=["prune", "export", "calib-stats"])
def test_other_stages_refuse_an_output_inside_the_input(cli_run, tmp_path, args):
    m = _outputs_model(tmp_path)
    before = _outputs_tree(m)
    n = 2 if args[0] == "calib" else 1
    r = cli_run(*args[:n], m, *args[n:], "--force", "-o", m / "out")
    _outputs_one_line(r, "is inside the input")
    assert _outputs_tree(m) == before


def test_calib_prepare_refuses_a_token_file_inside_the_model(cli_run, tmp_path):
    m = _outputs_model(tmp_path)
    before = _outputs_tree(m)
    r = cli_run("calib", "prepare", m, "--num-samples", "2", "--seq-len", "32", "-o", m / "calib.safetensors")
    _outputs_one_line(r, "is inside the input")
    assert _outputs_tree(m) == before


def test_run_output_containing_the_model_is_refused(cli_run, tmp_path):
    m = _outputs_model(tmp_path)
    rec = tmp_path / "r.yaml"
    rec.write_text(f"model: {m}\nquantize: {{format: fp8}}\n")
    before = _outputs_tree(tmp_path)
    r = cli_run("run", rec, "-o", tmp_path)
    _outputs_one_line(r, "contains the input")
    assert _outputs_tree(tmp_path) == before


def test_output_dot_in_an_empty_directory(cli_run, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    r = cli_run("quantize", "tiny-qwen3-moe", "--format", "fp8", "--num-samples", "4", "--seq-len", "32", "-o", ".",
                "--quiet")  # calibrated, on little data: -o . is the point
    assert r.exit_code == 0, r.output
    from moepress.pipeline.runner import output_complete

    assert output_complete(Path(".")) and Path("config.json").is_file()  # the shell's directory holds it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]  # no here.partial, no lock left
    assert not any(p.name.endswith(".partial") for p in here.iterdir())


def test_output_dot_replaced_is_never_left_vouched_for_half_empty(tmp_path, monkeypatch):
    """-o . --force: OUT's old entries are moved away one by one; a kill after the first move left the
    old manifest vouching for a directory whose other files were already gone."""
    import torch

    from moepress.compress.checkpoint import CheckpointWriter
    from moepress.compress.checkpoint import writer as writer_mod
    from moepress.manifest import MANIFEST_NAME

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for name in ("a.json", "tokenizer.json", "z.json", MANIFEST_NAME):
        (here / name).write_text("{}")
    real, moved = writer_mod.os.replace, []

    def replace_then_die(a, b):
        real(a, b)
        if Path(a).resolve().parent == here.resolve():  # one of OUT's old entries moved away
            moved.append(Path(a).name)
            raise KeyboardInterrupt  # the kill, right after the first one

    w = CheckpointWriter(Path("."), force=True)
    w.add("model.embed_tokens.weight", torch.ones(2, 2))
    monkeypatch.setattr(writer_mod.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        w.commit()
    assert moved == [MANIFEST_NAME] and not (here / MANIFEST_NAME).exists()


def test_rule_with_an_unknown_format_names_the_rule(cli_run, tmp_path):
    r = cli_run("quantize", "tiny-qwen3-moe", "--rule", "x=int9", "-o", tmp_path / "O")
    line = _outputs_one_line(r, "--rule x=int9: expected one of", "fp8")
    assert "--format" not in line and not (tmp_path / "O").exists()


# ---- issue 19 case 3: publishing trusts nothing it cannot recompute; case 9: publish --to a file ----

F3_PASS = ("--max-ppl-increase", "50%", "--min-top1", "0.5", "--max-kl", "1")  # FP8-block on the tiny model passes
F3_FAIL = ("--max-kl", "0")  # ... and fails this one (its KL is > 0)
F3_FAST = ("--seq-len", 32, "--max-samples", 2, "--quiet")




def _f3_tree(d) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _f3_manifest(d, edit=None) -> dict:
    import json

    p = d / "moepress-manifest.json"
    m = json.loads(p.read_text())
    if edit is not None:
        edit(m)
        p.write_text(json.dumps(m, indent=2))
    return m


def _f3_artifact(root, cli_run, *gates):
    """A moepress artifact (calibration-free FP8-block quantize) checked by the real `moepress check`."""
    from moepress import models

    art = root / "art"
    r = cli_run("quantize", models.path("tiny-qwen3-moe"), "--format", "fp8-block", "-o", art, "--quiet")
    assert r.exit_code == 0, r.output
    r = cli_run("check", art, "--reference", models.path("tiny-qwen3-moe"), *F3_FAST, *gates)
    assert r.exit_code in (0, 1), r.output
    return art


@pytest.fixture(scope="module")
def f3_checked(tmp_path_factory):
    """(passed, failed): the same artifact after a passing and after a failing check (copy before editing)."""
    import shutil

    from click.testing import CliRunner

    from moepress.cli import cli

    def run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)

    root = tmp_path_factory.mktemp("f3")
    passed = _f3_artifact(root, run, *F3_PASS)
    failed = root / "failed"
    shutil.copytree(passed, failed)
    assert run("check", failed, "--reference", "tiny-qwen3-moe", *F3_FAST, *F3_FAIL).exit_code == 1
    assert _f3_manifest(passed)["accuracy"]["passed"] is True and _f3_manifest(failed)["accuracy"]["passed"] is False
    return passed, failed


def _f3_copy(src, tmp_path):
    import shutil

    return shutil.copytree(src, tmp_path / "art")


def test_publish_checked_artifact_seal_verified_or_said_unverifiable(f3_checked, tmp_path, cli_run, monkeypatch):
    import json

    art = _f3_copy(f3_checked[0], tmp_path)
    acc = _f3_manifest(art)["accuracy"]
    assert set(acc["files"]) >= {"config.json", "model.safetensors.index.json", "model-00001-of-00006.safetensors"}
    assert acc["gates"] and all({"metric", "value", "op", "threshold", "passed"} <= set(g) for g in acc["gates"])
    assert acc["seal"]["alg"] == "hmac-sha256"
    r = cli_run("publish", art, "--to", tmp_path / "pub", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["seal"] == "verified" and res["verified"] and res["accuracy_passed"] is True
    assert res["output"] == res["published"] == str(tmp_path / "pub")
    assert _f3_tree(tmp_path / "pub") == _f3_tree(art)
    # another machine: no key, so a section edited to pass could not be told apart: refused, --force says it
    monkeypatch.setenv("MOEPRESS_KEY_FILE", str(tmp_path / "no-key"))
    _one_line(cli_run("publish", art, "--to", tmp_path / "pub2"), "cannot verify the accuracy section's seal",
              "no manifest key at", "MOEPRESS_KEY_FILE")
    assert not (tmp_path / "pub2").exists()
    r = cli_run("publish", art, "--to", tmp_path / "pub2", "--force", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["seal"].startswith("not verified: no key at") and not res["verified"], res
    assert not (tmp_path / "no-key").exists()


def test_publish_refuses_accuracy_passed_edited_after_failed_check(f3_checked, tmp_path, cli_run, monkeypatch):
    art = _f3_copy(f3_checked[1], tmp_path)

    def edit(m):
        m["accuracy"]["passed"] = True
        m["accuracy"]["failed"] = []

    _f3_manifest(art, edit)
    before = _f3_tree(art)
    _one_line(cli_run("publish", art, "--to", tmp_path / "pub"), "moepress-manifest.json",
                 "accuracy section edited after the check")
    # without the key (another machine) the recomputed verdict refuses it too
    monkeypatch.setenv("MOEPRESS_KEY_FILE", str(tmp_path / "no-key"))
    _one_line(cli_run("publish", art, "--to", tmp_path / "pub"), "accuracy.passed is True",
                 "gates fail (", "kl_mean", "edited after the check")
    assert not (tmp_path / "pub").exists() and not (tmp_path / "pub.partial").exists()
    assert _f3_tree(art) == before
    # --force keeps its meaning: published anyway, and the result says what was overridden
    r = cli_run("publish", art, "--to", tmp_path / "pub", "--force")
    assert r.exit_code == 0 and "published despite (--force)" in r.stdout and (tmp_path / "pub").is_dir()


def test_publish_without_the_key_recomputes_each_gate_from_its_value(f3_checked, tmp_path, cli_run, monkeypatch):
    """Every record edited consistently (accuracy.passed, failed and each gate's passed): without the key that
    seals it, publish still recomputes each gate from its value and threshold and names the one that fails."""
    art = _f3_copy(f3_checked[1], tmp_path)

    def edit(m):
        m["accuracy"]["passed"] = True
        m["accuracy"]["failed"] = []
        for g in m["accuracy"]["gates"]:
            g["passed"] = True if g.get("passed") is not None else None

    _f3_manifest(art, edit)
    monkeypatch.setenv("MOEPRESS_KEY_FILE", str(tmp_path / "no-key"))
    _one_line(cli_run("publish", art, "--to", tmp_path / "pub"), "recorded passed True, but", "is False")
    assert not (tmp_path / "pub").exists() and not (tmp_path / "pub.partial").exists()


def test_publish_refuses_tampered_shard_with_updated_manifest_digest(f3_checked, tmp_path, cli_run, monkeypatch):
    from moepress.manifest import sha256_file

    art = _f3_copy(f3_checked[0], tmp_path)
    shard = art / "model-00002-of-00006.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))

    def edit(m):  # the files section now agrees with the tampered shard
        m["files"][shard.name] = {"sha256": sha256_file(shard), "size": shard.stat().st_size}

    _f3_manifest(art, edit)
    for key in (None, str(tmp_path / "no-key")):
        if key:
            monkeypatch.setenv("MOEPRESS_KEY_FILE", key)
        _one_line(cli_run("publish", art, "--to", tmp_path / "pub"), shard.name,
                     "differs from the file the accuracy check measured")
        assert not (tmp_path / "pub").exists() and not (tmp_path / "pub.partial").exists()


def test_publish_refuses_check_with_every_gate_none(f3_checked, tmp_path, cli_run):
    art = _f3_copy(f3_checked[0], tmp_path)
    r = cli_run("check", art, "--reference", "tiny-qwen3-moe", *F3_FAST, "--max-ppl-increase", "none",
                "--min-top1", "none", "--max-kl", "none", "--max-layer-error", "none", "--min-routing-overlap", "none",
                "--max-expert-error", "none", "--max-expert-error-ratio", "none", "--max-weight-error-ratio", "none",
                "--max-attention-error-ratio", "none", "--report", tmp_path / "rep")
    assert r.exit_code == 0, r.output  # nothing was gated, so nothing failed
    # ... and nothing passed: the verdict says so (it printed PASS, as the report and the manifest's passed: true)
    assert "MEASURED, no gate applied" in r.output and "PASS" not in r.output
    assert (tmp_path / "rep" / "report.md").read_text().startswith("# Accuracy check: MEASURED, no gate applied")
    assert _f3_manifest(art)["accuracy"]["gates"] == [] and _f3_manifest(art)["accuracy"]["passed"] is None
    _one_line(cli_run("publish", art, "--to", tmp_path / "pub"), str(art), "applied no gate")
    assert not (tmp_path / "pub").exists()


def test_publish_refuses_missing_listed_file(f3_checked, tmp_path, cli_run):
    art = _f3_copy(f3_checked[0], tmp_path)
    (art / "model-00003-of-00006.safetensors").unlink()
    _one_line(cli_run("publish", art, "--to", tmp_path / "pub"), "model-00003-of-00006.safetensors",
                 "listed in the manifest but missing")
    assert not (tmp_path / "pub").exists() and not (tmp_path / "pub.partial").exists()


def test_publish_refuses_destination_overlapping_artifact(f3_checked, tmp_path, cli_run):
    art = _f3_copy(f3_checked[0], tmp_path)
    before = _f3_tree(art)
    for to, how in ((art / "pub", "is inside the artifact"), (art, "is the artifact"),
                    (tmp_path, "contains the artifact")):
        for force in ((), ("--force",)):
            _one_line(cli_run("publish", art, "--to", to, *force), f"--to {to}", how)
    assert _f3_tree(art) == before and not (art / "pub").exists() and not (art / "pub.partial").exists()


def test_publish_to_existing_file_is_one_line(f3_checked, tmp_path, cli_run):
    art = _f3_copy(f3_checked[0], tmp_path)
    dst = tmp_path / "dst.bin"
    dst.write_bytes(b"keep me")
    _one_line(cli_run("publish", art, "--to", dst), f"--to {dst}", "not a directory")
    assert dst.read_bytes() == b"keep me" and not (tmp_path / "dst.bin.partial").exists()


def test_publish_checks_the_copy_before_it_gets_its_name(f3_checked, tmp_path, cli_run, monkeypatch):
    """A copy that differs from the manifest (a disk or filesystem fault while copying) is removed, not
    published under --to; nothing of it is left (mutation audit: the copy's check could go unnoticed)."""
    import shutil

    from moepress.pipeline import publish as pub

    art, copytree = _f3_copy(f3_checked[0], tmp_path), shutil.copytree

    def faulty_copytree(src, dst, **kw):
        copytree(src, dst, **kw)
        shard = next(iter(sorted(dst.glob("model-*.safetensors"))))
        shard.write_bytes(shard.read_bytes()[:-1] + b"\0")

    monkeypatch.setattr(pub.shutil, "copytree", faulty_copytree)
    _one_line(cli_run("publish", art, "--to", tmp_path / "pub"), "model-00001-of-00006.safetensors",
              "sha256 differs", "(while copying)")
    assert not (tmp_path / "pub").exists() and not (tmp_path / "pub.partial").exists()


def test_publish_force_of_a_failed_check_reports_it_failed(f3_checked, tmp_path, cli_run):
    import json

    art = _f3_copy(f3_checked[1], tmp_path)
    r = cli_run("publish", art, "--to", tmp_path / "pub", "--force", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["accuracy_passed"] is False and res["verified"] is False
    assert len(res["forced"]) == 1 and "kl_mean" in res["forced"][0], res["forced"]


# ---- issue 19 case 2: build runs the checkpoint's own code only with --trust-remote-code ----

def _f2_export(tmp_path, architecture=None, tokenizer_class=None):
    """An hf-modelopt export (config.json + hf_quant_config.json) of tiny-qwen3-moe, an auto_map in its config.json."""
    import json

    from moepress import models

    d = tmp_path / "export"
    d.mkdir()
    cfg = json.loads((models.path("tiny-qwen3-moe") / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    if architecture:
        cfg["architectures"] = [architecture]
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None}}))
    if tokenizer_class:
        (d / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": tokenizer_class, "auto_map": {"AutoTokenizer": [f"tok.{tokenizer_class}", None]}}))
    return d


def _f2_bundle(out) -> tuple[str, str]:
    return (out / "serve.sh").read_text(), (out / "smoke.py").read_text()


def test_build_auto_map_native_model_without_remote_code(tmp_path, cli_run):
    art = _f2_export(tmp_path)
    r = cli_run("build", art, "--target", "h100", "-o", tmp_path / "b", "--dry-run")
    assert r.exit_code == 0, r.output
    serve, smoke = _f2_bundle(tmp_path / "b")
    assert "trust_remote_code" not in serve and "trust_remote_code" not in smoke
    assert "trust_remote_code" not in (tmp_path / "b" / "build.sh").read_text()
    r = cli_run("build", art, "--target", "h100", "-o", tmp_path / "b2", "--dry-run", "--trust-remote-code")
    assert r.exit_code == 0, r.output
    serve, smoke = _f2_bundle(tmp_path / "b2")
    assert "--trust_remote_code" in serve and "trust_remote_code=True" in smoke


def test_build_refuses_remote_code_without_flag(tmp_path, cli_run):
    for kw, needles in (({"architecture": "Qwen3MoeCustomForCausalLM"}, ("config.json", "auto_map")),
                        ({"tokenizer_class": "TikTokenTokenizer"}, ("tokenizer_config.json", "auto_map"))):
        sub = tmp_path / next(iter(kw.values()))
        sub.mkdir()
        art = _f2_export(sub, **kw)
        _one_line(cli_run("build", art, "--target", "h100", "-o", sub / "b", "--dry-run"), *needles,
                     "--trust-remote-code")
        assert sorted(p.name for p in sub.iterdir()) == ["export"]  # no OUT, no OUT.partial
        r = cli_run("build", art, "--target", "h100", "-o", sub / "b", "--dry-run", "--trust-remote-code")
        assert r.exit_code == 0, r.output
        serve, smoke = _f2_bundle(sub / "b")
        assert "--trust_remote_code" in serve and "trust_remote_code=True" in smoke


def test_recipe_build_trust_remote_code_is_an_explicit_bool(tmp_path):
    from moepress.errors import MoepressError
    from moepress.pipeline.recipe import normalise

    r = normalise({"model": "tiny-qwen3-moe", "build": {"targets": ["h100"]}})
    assert r["build"]["trust_remote_code"] is False  # never implied
    assert normalise({"model": "tiny-qwen3-moe", "build": {"targets": ["h100"], "trust_remote_code": True}}
                     )["build"]["trust_remote_code"] is True
    with pytest.raises(MoepressError, match="build.trust_remote_code: expected bool"):
        normalise({"model": "tiny-qwen3-moe", "build": {"targets": ["h100"], "trust_remote_code": "yes"}})


def test_run_refuses_to_resume_a_quantize_partial_of_a_changed_input(cli_run, tmp_path, monkeypatch):
    """`moepress run` resumes a cut-off quantize stage through the same writer: a source whose shards
    changed (mtime) since the partial was started is refused in one line, the partial kept; --from
    quantize starts the stage again."""
    import os

    from moepress import progress
    from moepress.compress.checkpoint import CheckpointWriter

    m = Path(shutil.copytree(models.path("tiny-qwen3-moe"), tmp_path / "M"))
    rec = tmp_path / "r.yaml"
    rec.write_text(f"model: {m}\ncalib: {{num_samples: 4, seq_len: 32}}\nquantize: {{format: fp8}}\ncheck: null\n")
    out = tmp_path / "run"

    class Killed(Exception):
        pass

    advance = progress.Task.advance

    def cut_off(self, n=1, note=""):
        advance(self, n, note)
        if self.stage == "quantize" and self.done == 2:
            raise Killed

    with monkeypatch.context() as mp:  # a kill after layer 1: the partial stays, its lock is dropped
        mp.setattr(progress.Task, "advance", cut_off)
        mp.setattr(CheckpointWriter, "abort", lambda self: (self.wait(), self._pool and self._pool.shutdown(),
                                                             self._lock.release()))
        with pytest.raises(Killed):
            cli_run("run", rec, "-o", out, "--quiet")
    partial = out / "quantize.partial"
    before = sorted(p.name for p in partial.iterdir())
    for shard in m.glob("*.safetensors"):  # same bytes, new mtime: not the input the partial was started from
        os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    r = cli_run("run", rec, "-o", out, "--quiet")
    line = _outputs_one_line(r, "quantize.partial", "another input", "--from quantize")
    assert "--resume" not in line
    assert sorted(p.name for p in partial.iterdir()) == before and not (out / "quantize").exists()
    r = cli_run("run", rec, "-o", out, "--quiet", "--from", "quantize")
    assert r.exit_code == 0, r.output
    assert (out / "quantize" / "config.json").is_file() and not partial.exists()


def test_build_is_refused_while_its_partial_is_locked_and_inside_its_artifact(tmp_path, cli_run):
    from moepress.outputs import OutputLock

    art = _f2_export(tmp_path)
    lock = OutputLock(tmp_path / "b.partial.lock", "held by the test")
    lock.acquire()
    try:
        r = cli_run("build", art, "--target", "h100", "-o", tmp_path / "b", "--dry-run")
        _outputs_one_line(r, "another moepress process is writing it", "b.partial is locked")
        assert not (tmp_path / "b").exists()
    finally:
        lock.release()
    r = cli_run("build", art, "--target", "h100", "-o", Path(art) / "engine", "--dry-run")
    _outputs_one_line(r, "the output is inside the input")
    assert not (Path(art) / "engine").exists()


def test_check_report_inside_the_candidate_is_refused(tmp_path, cli_run):
    cand = tmp_path / "cand"
    shutil.copytree(models.path("tiny-qwen3-moe"), cand)
    before = sorted(p.name for p in cand.iterdir())
    r = cli_run("check", cand, "--reference", "tiny-qwen3-moe", "--report", cand / "report")
    _outputs_one_line(r, "--report", "the output is inside the input")
    assert sorted(p.name for p in cand.iterdir()) == before


KILL_ARGS = ["--num-samples", "2", "--seq-len", "32", "--quiet"]


def _kill_args(fmt: str) -> list[str]:
    """KILL_ARGS, less the calibration options a calibration-free format refuses."""
    return KILL_ARGS if fmt == "fp8" else KILL_ARGS[-1:]


KILLS = [(fmt, where) for fmt in ("fp8-dynamic", "fp8") for where in ("after-progress", "after-shard")]


@pytest.fixture(scope="module")
def killed_quantizes(tmp_path_factory):
    """The partials the kill cases below resume, and their uninterrupted references (one per format, in-process
    with the one thread the killed children get from OMP_NUM_THREADS=1): {(fmt, where) | "calib": (dir, code,
    log)}, "ref": {fmt: dir}}. Each kill is a process of its own (helpers.killed_runs: forked, tests/forkserver.py)."""
    from helpers import cli_quantized, killed_runs

    d = tmp_path_factory.mktemp("killed")
    jobs, keys = [], []
    for fmt, where in KILLS:
        jobs.append({"args": ["quantize", "tiny-mixtral", "--format", fmt, *_kill_args(fmt), "-o",
                              str(d / f"{fmt}-{where}")],
                     "kill": where, "log": str(d / f"{fmt}-{where}.log")})
        keys.append((fmt, where))
    # the same --calib path with other contents after the kill (test_resume_refuses_a_partial_calibrated_on_...)
    calib = d / "c.txt"
    calib.write_text((models.path("tiny-qwen3-moe") / "config.json").read_text() * 20)
    jobs.append({"args": ["quantize", "tiny-mixtral", "--format", "fp8", "--calib", str(calib), *KILL_ARGS,
                          "-o", str(d / "calib" / "O")], "kill": "quantize:2", "log": str(d / "calib.log")})
    keys.append("calib")
    (d / "calib").mkdir()
    codes = killed_runs(jobs)
    killed = {k: (Path(j["args"][-1]), c, Path(j["log"]).read_text())
              for k, j, c in zip(keys, jobs, codes, strict=True)}
    killed["ref"] = {fmt: cli_quantized(d / f"ref-{fmt}", "tiny-mixtral", "--format", fmt, *_kill_args(fmt)[:-1])
                     for fmt in ("fp8-dynamic", "fp8")}
    killed["calib_file"] = calib
    return killed


@pytest.mark.parametrize("where", ["after-progress", "after-shard"])
@pytest.mark.parametrize("fmt", ["fp8-dynamic", "fp8"])  # calibration-free (background writes), calibrated
def test_resume_after_a_kill_between_progress_and_shard_is_byte_identical(cli_run, killed_quantizes, where, fmt):
    """The progress file (the report's totals) and the writer's journal are two files: a kill between
    their updates left a resumed run's quant_report / sidecar / configs missing a layer, or holding a
    layer twice. Totals are kept per layer and a resume keeps exactly the layers whose shards it keeps."""
    q, code, log = killed_quantizes[fmt, where]
    ref = killed_quantizes["ref"][fmt]
    assert code == 9 and not q.exists() and q.with_name(q.name + ".partial").is_dir(), log[-2000:]
    r = cli_run("quantize", "tiny-mixtral", "--format", fmt, *_kill_args(fmt), "--resume", "-o", q)
    assert r.exit_code == 0, r.stderr
    files = sorted(f.name for f in ref.iterdir() if f.name != "moepress-manifest.json")
    assert files == sorted(f.name for f in q.iterdir() if f.name != "moepress-manifest.json")
    for f in files:
        assert (q / f).read_bytes() == (ref / f).read_bytes(), f


def test_resume_refuses_a_partial_calibrated_on_data_since_edited(cli_run, killed_quantizes):
    """The same --calib path with other contents: resuming would write layers calibrated on two data sets."""
    out, code, log = killed_quantizes["calib"]
    calib = killed_quantizes["calib_file"]
    assert code == -9 and out.with_name("O.partial").is_dir(), log[-2000:]
    calib.write_text(calib.read_text()[::-1])
    r = cli_run("quantize", "tiny-mixtral", "--format", "fp8", "--calib", calib, *KILL_ARGS, "-o", out, "--resume")
    assert r.exit_code == 2 and "calib_content" in r.stderr and "without --resume" in r.stderr, r.stderr
    assert not out.exists()


def test_check_report_os_error_without_a_file_name_names_the_report(cli_run, tmp_path, monkeypatch, f3_checked):
    """A full disk under `check --report DIR` (matplotlib's write, which names no file) said only 'No space left
    on device (ENOSPC)'."""
    import moepress.checks as checks

    def full(result, out):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checks, "write_report", full)
    r = cli_run("check", _f3_copy(f3_checked[0], tmp_path), "--reference", "tiny-qwen3-moe", *F3_FAST,
                "--report", tmp_path / "rep")
    _outputs_one_line(r, f"{tmp_path / 'rep'}: No space left on device (ENOSPC)")


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupt_is_one_line_its_own_exit_code_and_keeps_the_finished_layers(tmp_path, sig):
    """Ctrl-C exited 1 (a failed check's code) with click's 'Aborted!', removed quantize's finished layers and
    printed no JSON; SIGTERM ended the process saying nothing."""
    import json
    import signal

    out = tmp_path / "O"
    # a process of its own (forked: tests/forkserver.py), its SIGINT handled as from a terminal (a shell's
    # background job, CI started with &, inherits SIGINT ignored, which moepress keeps ignored: nohup's contract)
    p = forkserver.run([sys.executable, "-m", "moepress", "quantize", "tiny-qwen3-moe", "--format", "fp8",
                        "--num-samples", "8", "--seq-len", "64", "-o", str(out), "--json", "--quiet"],
                       text=True, timeout=120,
                       env={**os.environ, "MOEPRESS_KILL_AT": f"quantize:2:{sig}"})  # the signal after layer 2
    stdout, stderr = p.stdout, p.stderr
    assert p.returncode == 128 + getattr(signal, sig), stderr
    line = f"interrupted by {sig}; the finished layers are kept in {tmp_path / 'O.partial'}: rerun with --resume"
    assert stderr.strip().splitlines() == [f"moepress: {line}"]
    assert json.loads(stdout) == {"error": line, "exit": 128 + getattr(signal, sig)}
    assert not out.exists() and list((tmp_path / "O.partial").glob("*.safetensors"))


@pytest.mark.slow
def test_an_interrupted_run_says_to_rerun_it_not_to_pass_resume(tmp_path):
    """`moepress run` interrupted in its quantize said "rerun with --resume", an option run does not have (it
    resumes a killed quantize by itself)."""
    import signal

    rec = tmp_path / "r.yaml"
    rec.write_text("model: tiny-qwen3-moe\ncalib: {num_samples: 8, seq_len: 64}\nquantize: {format: fp8}\n"
                   "check: null\n")
    p = forkserver.run([sys.executable, "-m", "moepress", "run", str(rec), "-o", str(tmp_path / "O"), "--quiet"],
                       text=True, timeout=120, env={**os.environ, "MOEPRESS_KILL_AT": "quantize:2:SIGINT"})
    assert p.returncode == 128 + signal.SIGINT, p.stderr
    kept = tmp_path / "O" / "quantize.partial"
    assert p.stderr.strip().splitlines() == [f"moepress: interrupted by SIGINT; the finished layers are kept in "
                                             f"{kept}: rerun it (run resumes it)"]


def test_an_output_in_a_folder_moepress_cannot_write_names_that_folder(tmp_path):
    """-o in a read-only folder: one line naming the folder and what is expected, not the internal lock file.
    As root, the folder's mode stops no write: the test drops root's override capabilities with capsh."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    cmd = [sys.executable, "-m", "moepress", "quantize", "tiny-qwen3-moe", "--format", "fp8-block", "-q",
           "-o", str(ro / "q")]
    if os.geteuid() == 0:
        if shutil.which("capsh") is None:
            pytest.skip("root without capsh: a read-only folder cannot be made")
        cmd = ["capsh", "--drop=cap_dac_override,cap_dac_read_search,cap_fowner", "--", "-c",
               " ".join(f"'{c}'" for c in cmd)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1] == (f"moepress: error: {ro}: cannot write there (Permission denied); "
                                                 "expected a writable folder to hold q.partial"), p.stderr
    assert list(ro.iterdir()) == []


def test_a_second_calib_prepare_of_the_same_file_at_once_is_refused(cli_run, tmp_path):
    """Both wrote and both said "wrote ... seed N", one's samples lost; the lock is held from the exists check to
    the rename."""
    from moepress.outputs import OutputLock

    out = tmp_path / "t.safetensors"
    lock = OutputLock(tmp_path / "t.safetensors.lock", "held by the test")
    lock.acquire()  # another `calib prepare -o t.safetensors` writing it
    try:
        r = cli_run("calib", "prepare", "tiny-mixtral", "--num-samples", "2", "--seq-len", "16", "-o", out)
        _outputs_one_line(r, f"-o {out}: another moepress process is writing it", "t.safetensors.lock is locked")
        assert not out.exists()
    finally:
        lock.release()
    r = cli_run("calib", "prepare", "tiny-mixtral", "--num-samples", "2", "--seq-len", "16", "-o", out, "--quiet")
    assert r.exit_code == 0 and out.exists(), r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors", "t.safetensors.json"]


def test_a_refused_calib_prepare_leaves_no_folder_it_made(cli_run, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("a few words\n")
    out = tmp_path / "new" / "sub" / "t.safetensors"
    r = cli_run("calib", "prepare", "tiny-mixtral", "--num-samples", "2", "--seq-len", "16", "--calib", small,
                "-o", out)
    assert r.exit_code == 2 and "fewer than one sample" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.txt"]
