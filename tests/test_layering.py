"""The package's layering: every import inside lowrank/ points down the levels, the
module-level imports form no cycle, function-local imports are only for optional dependencies,
and no module plays `__getattr__` tricks. An AST check, so that the structure stays.

| level | modules |
| --- | --- |
| 0 base | dtypes, backend, config, native, nf4_format, layer_types, tensor_memory, checkpoint |
| 1 kernels | lowrank/kernels/*.py |
| 2 ops | lowrank/ops/*.py |
| 3 modules | nf4_linear, lora_linear, modules_to_save, trainable_tokens |
| 4 model | patch, qlora, merge, adapters, adapter_files |
| 5 jobs | plan, compare, inspect_adapter, merge_files, train |
| 6 entry | lowrank/__init__.py, cli |
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LEVELS = {
    "lowrank.dtypes": 0, "lowrank.backend": 0, "lowrank.config": 0, "lowrank.native": 0,
    "lowrank.nf4_format": 0, "lowrank.layer_types": 0, "lowrank.tensor_memory": 0, "lowrank.checkpoint": 0,
    "lowrank.kernels": 1,  # and every lowrank.kernels.* module
    "lowrank.kernels.dora_norms": 1,  # imports nf4_lora_matmul's tile decoders: a level-1 import within level 1
    "lowrank.ops": 2,  # and every lowrank.ops.* module
    "lowrank.nf4_linear": 3, "lowrank.lora_linear": 3, "lowrank.modules_to_save": 3,
    "lowrank.trainable_tokens": 3,
    "lowrank.patch": 4, "lowrank.qlora": 4, "lowrank.merge": 4, "lowrank.adapters": 4,
    "lowrank.adapter_files": 4, "lowrank.summary": 4, "lowrank.hf": 4,
    "lowrank.plan": 5, "lowrank.compare": 5, "lowrank.inspect_adapter": 5, "lowrank.merge_files": 5,
    "lowrank.train": 5,
    "lowrank": 6, "lowrank.cli": 6,
}
LEVEL_NAMES = ["base", "kernels", "ops", "modules", "model", "jobs", "entry"]
# What a function body may import: dependencies lowrank runs without (each use says why; numpy
# only for Triton's CPU interpreter), and the Triton kernels, which the ops import on their Triton
# path only.
OPTIONAL = {"triton", "numpy", "transformers", "bitsandbytes", "peft", "matplotlib"}
LAZY_OK = ("lowrank.kernels",)


def package_sources() -> dict[str, tuple[str, str]]:
    """{module name: (path, source)} for lowrank/ (lowrank/kernels/ included)."""
    out = {}
    for folder, package in (("lowrank", "lowrank"),):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for f in files:
                if not f.endswith(".py"):
                    continue
                name = prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"
                path = os.path.join(dirpath, f)
                with open(path, encoding="utf-8") as fh:
                    out[name] = (path, fh.read())
    return out


def level_of(module: str) -> int | None:
    """The module's level: its own entry, or its package's for lowrank.kernels.* and lowrank.ops.*."""
    if module in LEVELS:
        return LEVELS[module]
    for package in ("lowrank.kernels", "lowrank.ops"):
        if module.startswith(package + "."):
            return LEVELS[package]
    return None


def _is_package(name: str, sources: dict) -> bool:
    return os.path.basename(sources[name][0]) == "__init__.py"


def _imports(name: str, tree: ast.Module, sources: dict):
    """(target module, line, function-local?) for every import in a module; `from X import y`
    targets X.y when that is a module of the package, else X."""
    base = name if _is_package(name, sources) else name.rpartition(".")[0]
    local_lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    local_lines.add(id(sub))
    for node in ast.walk(tree):
        local = id(node) in local_lines
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, local
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                root = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{root}.{node.module}" if node.module else root
            else:
                mod = node.module
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                yield (sub if sub in sources else mod), node.lineno, local


def violations(sources: dict[str, tuple[str, str]]) -> list[str]:
    """Every breach of the layering in `sources` ({module: (path, source)}), as readable lines."""
    problems, edges = [], {}
    for name, (path, text) in sorted(sources.items()):
        where = os.path.relpath(path, ROOT)
        mine = level_of(name)
        if mine is None:
            problems.append(f"{where}: module {name} has no level (add it to LEVELS here and to the README)")
            continue
        tree = ast.parse(text, filename=path)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                problems.append(f"{where}:{node.lineno}: a module-level __getattr__ (import what you export)")
        for target, line, local in _imports(name, tree, sources):
            top = target.split(".")[0]
            if top != "lowrank":
                if local and top not in OPTIONAL:
                    problems.append(f"{where}:{line}: function-local import of {target}: only optional "
                                    f"dependencies ({', '.join(sorted(OPTIONAL))}) are imported inside functions")
                continue
            theirs = level_of(target)
            if theirs is not None and theirs > mine:
                problems.append(f"{where}:{line}: {name} ({LEVEL_NAMES[mine]}, level {mine}) imports {target} "
                                f"({LEVEL_NAMES[theirs]}, level {theirs}): imports must point down")
            if local:
                if not target.startswith(LAZY_OK):
                    problems.append(f"{where}:{line}: function-local import of {target}: move the code to the "
                                    f"right level instead of importing inside a function")
                continue
            # Importing a.b.c runs the packages a.b (unless the importer is inside it) and a.b.c.
            chain = target.split(".")
            for i in range(2, len(chain) + 1):
                mod = ".".join(chain[:i])
                if mod in sources and not (name == mod or name.startswith(mod + ".")):
                    edges.setdefault(name, set()).add(mod)
    # Cycles among module-level imports.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                problems.append("import cycle: " + " -> ".join(cycle))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return problems


def test_every_import_points_down_and_nothing_cycles():
    sources = package_sources()
    assert "lowrank.kernels.lora_matmul" in sources and "lowrank.ops.sgmv" in sources
    assert "lowrank.kernels.dora_norms" in sources
    problems = violations(sources)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", ["lowrank.kernels.lora_matmul", "lowrank.kernels.dora_norms", "lowrank.ops.sgmv",
                                    "lowrank.nf4_format"])
def test_an_upward_import_is_caught(module):
    """The check can fail: `from lowrank.patch import ...` added to a kernel, an op or a base module."""
    sources = package_sources()
    path, text = sources[module]
    sources[module] = (path, text + "\nfrom lowrank.patch import patch_linear\n")
    problems = violations(sources)
    assert any("imports lowrank.patch" in p and "must point down" in p for p in problems), problems


def test_a_cycle_and_a_lazy_dodge_are_caught():
    sources = package_sources()
    path, text = sources["lowrank.patch"]
    # adapters imports patch at module level; patch importing adapters back closes a cycle
    sources["lowrank.patch"] = (path, text + "\nfrom .adapters import set_adapter\n")
    path, text = sources["lowrank.merge"]
    sources["lowrank.merge"] = (path, text + "\ndef _dodge():\n    from .adapters import set_adapter\n")
    path, text = sources["lowrank.config"]
    sources["lowrank.config"] = (path, text + "\ndef __getattr__(name):\n    raise AttributeError(name)\n")
    problems = violations(sources)
    assert any(p.startswith("import cycle:") and "lowrank.adapters" in p and "lowrank.patch" in p
               for p in problems), problems
    assert any("merge.py" in p and "function-local import of lowrank.adapters" in p for p in problems), problems
    assert any("config.py" in p and "__getattr__" in p for p in problems), problems


def test_a_module_without_a_level_is_caught():
    sources = package_sources()
    sources["lowrank.extras"] = (os.path.join(ROOT, "lowrank", "extras.py"), "import torch\n")
    assert any("lowrank.extras has no level" in p for p in violations(sources))
