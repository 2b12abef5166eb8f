"""moepress/codeid.py: the running code's id names the same code alike however it is installed, and follows its
modules only. A package layout is built by hand (a wheel nests compress/ inside moepress/; an editable install
maps each package to its own folder) and the import system pointed at it."""

from __future__ import annotations

import importlib.util
import json
import os
import re

from moepress import codeid

MODULES = {"moepress": {"__init__.py": "A = 1\n", "cli/__init__.py": "B = 2\n"},
           "moepress.compress": {"__init__.py": "C = 3\n", "quant/fp8.py": "D = 4\n"}}


def _write(root, files: dict):
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _digest(monkeypatch, locations: dict, *packages: str) -> str:
    """package_digest of ``packages`` (default: MODULES') with each package found at ``locations[name]``."""
    class Spec:
        def __init__(self, where):
            self.submodule_search_locations = [str(where)]

    monkeypatch.setattr(codeid.importlib.util, "find_spec", lambda name: Spec(locations[name]))
    try:
        return codeid.package_digest.__wrapped__(*(packages or MODULES))
    finally:
        monkeypatch.setattr(codeid.importlib.util, "find_spec", importlib.util.find_spec)


def test_a_wheel_and_an_editable_install_of_the_same_code_have_the_same_digest(tmp_path, monkeypatch):
    apart, nested = tmp_path / "editable", tmp_path / "wheel"
    _write(apart / "moepress", MODULES["moepress"])
    _write(apart / "compress", MODULES["moepress.compress"])
    _write(nested / "moepress", MODULES["moepress"])
    _write(nested / "moepress" / "compress", MODULES["moepress.compress"])
    a = _digest(monkeypatch, {"moepress": apart / "moepress", "moepress.compress": apart / "compress"})
    b = _digest(monkeypatch, {"moepress": nested / "moepress", "moepress.compress": nested / "moepress" / "compress"})
    assert a == b and re.fullmatch(r"[0-9a-f]{16}", a)
    (nested / "moepress" / "compress" / "quant" / "fp8.py").write_text("D = 5\n")  # other code: another digest
    assert _digest(monkeypatch, {"moepress": nested / "moepress",
                                 "moepress.compress": nested / "moepress" / "compress"}) != b


def test_only_importable_module_files_count_and_an_unreadable_one_does_not_stop_it(tmp_path, monkeypatch):
    root = tmp_path / "pkg"
    _write(root / "moepress", MODULES["moepress"])
    _write(root / "compress", MODULES["moepress.compress"])
    where = {"moepress": root / "moepress", "moepress.compress": root / "compress"}
    clean = _digest(monkeypatch, where)
    (root / "compress" / ".#fp8.py").symlink_to("user@host.1234:1700000000")  # Emacs's lock link: dangling
    (root / "compress" / "__pycache__").mkdir()
    (root / "compress" / "__pycache__" / "x.py").write_text("E = 6\n")
    (root / "compress" / "notes.txt").write_text("not a module\n")
    assert _digest(monkeypatch, where) == clean
    if os.geteuid() != 0:  # root reads a mode-000 file anyway
        (root / "compress" / "quant" / "fp8.py").chmod(0)
        assert _digest(monkeypatch, where) != clean  # named as unreadable, not skipped, not a crash


def test_an_install_without_module_files_says_so(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    assert _digest(monkeypatch, {n: tmp_path / "empty" for n in MODULES}) == "no-source"


def test_every_manifest_records_the_code_id(cli_run, tmp_path):
    out = tmp_path / "q"
    assert cli_run("quantize", "tiny-qwen3-moe", "--format", "fp8-block", "-q", "-o", out).exit_code == 0
    recorded = json.loads((out / "moepress-manifest.json").read_text())["versions"]["moepress"]
    assert recorded == codeid.code_id() and re.fullmatch(r"\d+\.\d+\.\d+\+[0-9a-f]{16}", recorded), recorded
