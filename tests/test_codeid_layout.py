"""moepress/codeid.py's digest is of each importable module's dotted name AND bytes, independent of the
order the file system lists them, and covers every package of moepress. A package layout is built by hand and
the import system pointed at it (as tests/test_codeid.py does)."""

from __future__ import annotations

import pathlib
import tomllib

from test_codeid import _digest, _write

from moepress import codeid

FILES = {"__init__.py": "A = 1\n", "cli/__init__.py": "B = 2\n", "quant/fp8.py": "D = 4\n",
         "quant/int4.py": "E = 5\n"}


def _tree(root: pathlib.Path, files: dict = FILES) -> pathlib.Path:
    return _write(root, files)


def test_a_module_renamed_with_the_same_bytes_is_other_code(tmp_path, monkeypatch):
    """The digest keys each file by its dotted name: fp8.py renamed fp9.py (same bytes, same sorted place) is
    other code (`import ...quant.fp8` now fails), so its digest differs."""
    root = _tree(tmp_path / "pkg")
    before = _digest(monkeypatch, {"moepress": root}, "moepress")
    (root / "quant" / "fp8.py").rename(root / "quant" / "fp9.py")
    assert _digest(monkeypatch, {"moepress": root}, "moepress") != before


def test_the_digest_does_not_depend_on_the_order_the_file_system_lists_files(tmp_path, monkeypatch):
    """The same files listed in another order (another file system, a copy) are the same code."""
    root = _tree(tmp_path / "pkg")
    real = pathlib.Path.rglob
    monkeypatch.setattr(pathlib.Path, "rglob", lambda self, pat: iter(sorted(real(self, pat))))
    forward = _digest(monkeypatch, {"moepress": root}, "moepress")
    monkeypatch.setattr(pathlib.Path, "rglob", lambda self, pat: iter(sorted(real(self, pat), reverse=True)))
    assert _digest(monkeypatch, {"moepress": root}, "moepress") == forward


def test_a_py_file_that_is_no_importable_module_does_not_count(tmp_path, monkeypatch):
    """A file manager's "fp8 copy.py", an editor's regular-file ".#fp8.py" and a script in a folder whose name is no
    identifier are not modules of the package: the code (what imports) is the same."""
    root = _tree(tmp_path / "pkg")
    clean = _digest(monkeypatch, {"moepress": root}, "moepress")
    (root / "quant" / "fp8 copy.py").write_text("D = 99\n")
    (root / "quant" / ".#fp8.py").write_text("D = 98\n")
    (root / "my-scripts").mkdir()
    (root / "my-scripts" / "tool.py").write_text("T = 1\n")
    assert _digest(monkeypatch, {"moepress": root}, "moepress") == clean


def test_an_unreadable_module_is_named_not_skipped_even_as_root(tmp_path, monkeypatch):
    """Root reads a mode-000 file, so the existing test skips this there; the read error is simulated instead.
    An unreadable fp8.py is not the same code as no fp8.py at all."""
    root = _tree(tmp_path / "pkg")
    (tmp_path / "gone").mkdir()
    gone = _tree(tmp_path / "gone", {k: v for k, v in FILES.items() if k != "quant/fp8.py"})
    without = _digest(monkeypatch, {"moepress": gone}, "moepress")
    clean = _digest(monkeypatch, {"moepress": root}, "moepress")
    real = pathlib.Path.read_bytes

    def read_bytes(self):
        if self.name == "fp8.py":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    unreadable = _digest(monkeypatch, {"moepress": root}, "moepress")
    assert unreadable not in (clean, without)


def test_the_code_id_covers_every_package_of_moepress(tmp_path, monkeypatch):
    """code_id() names every package of pyproject's package map: an edit in any one is other code."""
    pyproject = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
    names = pyproject["tool"]["setuptools"]["package-dir"]
    where = {name: _tree(tmp_path / name.replace(".", "_"), {"__init__.py": f"N = {name!r}\n", "m.py": "X = 1\n"})
             for name in names}

    class Spec:
        def __init__(self, p):
            self.submodule_search_locations = [str(p)]

    monkeypatch.setattr(codeid.importlib.util, "find_spec", lambda name: Spec(where[name]))
    codeid.package_digest.cache_clear()
    try:
        before = codeid.code_id()
        for name, root in where.items():
            (root / "m.py").write_text((root / "m.py").read_text() + "# edited\n")
            codeid.package_digest.cache_clear()
            now = codeid.code_id()
            assert now != before, f"an edit in {name} left the code id unchanged"
            before = now
    finally:
        monkeypatch.undo()
        codeid.package_digest.cache_clear()
