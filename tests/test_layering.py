"""The package's layers import one way (README "Architecture"), checked over the import graph.

Bottom: ``compat``, ``data``, ``losses`` (pure torch). Above them ``parallel`` (the only code that calls
``torch.distributed``, groups passed in), then ``models`` (may use ``parallel``), then ``config``
(its schema embeds the model dataclasses), ``testing``, and on top ``training``, ``eval``, ``demo``.
Function-level imports count too.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "redi_megatron"
ALLOWED = {
    "compat": set(),
    "data": set(),
    "losses": {"data"},
    "parallel": {"compat", "data", "losses"},
    "models": {"compat", "data", "parallel"},
    "config": {"models"},
    "testing": {"compat", "data", "losses", "parallel", "models", "config"},
    "training": {"compat", "data", "losses", "parallel", "models", "config"},
    "convert": {"compat", "data", "losses", "parallel", "models", "config", "training"},
    "eval": {"data"},
    "demo": {"compat", "data", "losses", "parallel", "models", "config", "training", "eval", "convert"},
}
DISTRIBUTED_OK = {"parallel", "testing"}
# standard-library-only modules at the package root, usable from every layer
BASE = {"console", "errors", "locks", "outputs", "typed"}


def _imports(path: pathlib.Path) -> set[str]:
    parts = path.relative_to(ROOT).parts
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:  # relative import: resolve against this file's package
                out.add(".".join(("redi_megatron",) + parts[:len(parts) - node.level] + (node.module,)))
            else:
                out.add(node.module)
    return out


def _graph() -> dict[str, dict[str, set[str]]]:
    graph: dict[str, dict[str, set[str]]] = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if len(parts) < 2:
            continue
        graph.setdefault(parts[0], {})[str(path.relative_to(ROOT))] = _imports(path)
    return graph


def test_layers_import_one_way():
    graph = _graph()
    assert set(graph) <= set(ALLOWED), f"new package(s) {set(graph) - set(ALLOWED)}: give them a layer"
    bad = []
    for layer, files in graph.items():
        for path, mods in files.items():
            for mod in mods:
                if mod.startswith("redi_megatron."):
                    target = mod.split(".")[1]
                    if target != layer and target not in ALLOWED[layer] and target not in BASE:
                        bad.append(f"{path} imports {mod} ({layer} -> {target})")
                launcher = mod == "torch.distributed.run"
                if mod.startswith("torch.distributed") and layer not in DISTRIBUTED_OK and not launcher:
                    bad.append(f"{path} imports {mod}: only parallel/ talks to torch.distributed")
    assert not bad, "\n".join(bad)


def test_base_modules_import_nothing_of_the_package():
    for name in BASE:
        mods = _imports(ROOT / f"{name}.py")
        assert not [m for m in mods if m.startswith("redi_megatron") and m.split(".")[1] not in BASE], (name, mods)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The check itself can fail: a losses module that imports parallel is reported."""
    fake = tmp_path / "redi_megatron"
    (fake / "losses").mkdir(parents=True)
    (fake / "losses" / "bad.py").write_text("from redi_megatron.parallel.context import split_for_cp\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", fake)
    try:
        test_layers_import_one_way()
    except AssertionError as err:
        assert "losses -> parallel" in str(err)
    else:
        raise AssertionError("the layering check missed losses -> parallel")
