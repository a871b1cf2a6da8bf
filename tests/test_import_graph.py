"""The layering of docs/architecture.md, checked on the source (every import, also inside functions):

- nothing under pipeline/ imports stages/ (the library does not depend on its users), and
  only pipeline/stage_registry.py turns a module name into a module;
- no stage imports another stage (stages meet only through pipeline.artifacts);
- tools/*.py use the library, or a stage's public ``run`` and nothing else of it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = Path("pipeline/stage_registry.py")


def _is_stages(module: str | None) -> bool:
    return module is not None and (module == "stages" or module.startswith("stages."))


def _stage_imports(tree: ast.AST) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every import that reaches the stages package."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if _is_stages(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_stages(node.module):
            found.append((node.lineno, node.module or "", [a.asname or a.name for a in node.names]))
    return found


def _dynamic_imports(tree: ast.AST) -> list[int]:
    """Lines calling importlib.import_module or __import__."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__"):
                lines.append(node.lineno)
    return lines


def _uses_other_than_run(tree: ast.AST, alias: str) -> list[str]:
    """Attributes of the imported stage module ``alias`` used other than ``run`` (and bare uses)."""
    bad = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == alias
            and node.attr != "run"
        ):
            bad.append(f"{alias}.{node.attr} (line {node.lineno})")
    return bad


def violations(root: Path) -> list[str]:
    """Every breach of the layering in the tree at ``root`` (pipeline/, stages/, tools/)."""
    found = []
    for path in sorted(root.glob("pipeline/**/*.py")):
        relative = path.relative_to(root)
        tree = ast.parse(path.read_text(), str(relative))
        found += [f"{relative}:{line}: the library imports {module}" for line, module, _ in _stage_imports(tree)]
        if relative != REGISTRY:
            found += [
                f"{relative}:{line}: imports a module by name outside {REGISTRY}" for line in _dynamic_imports(tree)
            ]
    for path in sorted(root.glob("stages/*.py")):
        relative = path.relative_to(root)
        tree = ast.parse(path.read_text(), str(relative))
        found += [f"{relative}:{line}: a stage imports {module}" for line, module, _ in _stage_imports(tree)]
        found += [f"{relative}:{line}: a stage imports a module by name" for line in _dynamic_imports(tree)]
    for path in sorted(root.glob("tools/*.py")):
        relative = path.relative_to(root)
        tree = ast.parse(path.read_text(), str(relative))
        for line, module, names in _stage_imports(tree):
            if module == "stages":  # from stages import prepare: only prepare.run may be used
                found += [
                    f"{relative}: uses the stage internal {use}"
                    for name in names
                    for use in _uses_other_than_run(tree, name)
                ]
            elif names and names != ["run"]:  # from stages.prepare import X
                found.append(f"{relative}:{line}: imports {', '.join(names)} from {module} (only run is public)")
            elif not names:  # import stages.prepare: module attributes used through the dotted name
                found.append(f"{relative}:{line}: import {module} (use `from stages import NAME` and NAME.run)")
    return found


def test_the_repository_keeps_its_layers():
    assert violations(ROOT) == []


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    files = {
        "pipeline/cli.py": "def main():\n    import stages\n",
        "pipeline/deep/mod.py": "from stages.encode import run\n",
        "pipeline/loader.py": "import importlib\nimportlib.import_module('stages.x')\n",
        "pipeline/stage_registry.py": "import importlib\nimportlib.import_module('stages.x')\n",  # allowed here
        "stages/sample.py": "from stages import diffusion as diffusion_stage\n",
        "stages/evaluate.py": "import stages.sample\n",
        "stages/ok.py": "from pipeline import artifacts\n",
        "tools/bench_a.py": "from stages import encode\nencode.load_autoencoder(1)\nencode.run(1)\n",
        "tools/bench_b.py": "from stages.sample import labels_for\n",
        "tools/bench_ok.py": "from stages import prepare\nfrom stages.encode import run\nprepare.run(1)\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = violations(tmp_path)
    assert found == [
        "pipeline/cli.py:2: the library imports stages",
        "pipeline/deep/mod.py:1: the library imports stages.encode",
        "pipeline/loader.py:2: imports a module by name outside pipeline/stage_registry.py",
        "stages/evaluate.py:1: a stage imports stages.sample",
        "stages/sample.py:1: a stage imports stages",
        "tools/bench_a.py: uses the stage internal encode.load_autoencoder (line 2)",
        "tools/bench_b.py:1: imports labels_for from stages.sample (only run is public)",
    ]


@pytest.mark.parametrize("name", ["prepare", "autoencoder", "encode", "diffusion", "sample", "evaluate"])
def test_every_registered_stage_module_exists_and_has_run(name):
    """The registry's module paths are strings: check each names a real stage module with run(cfg)."""
    from pipeline import stage_registry

    spec = stage_registry.get(name)
    path = ROOT / (spec.module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in tree.body), spec.module
    assert spec.doc().splitlines()[0].startswith(f"Stage `{name}`")
