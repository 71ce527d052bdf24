"""The house rules that keep a family one folder and the code free of circles, checked on the source itself.

* Nothing outside `families/` names a family: no import of `lorakit.families.<name>`, no string that is a
  family's name, no family-specific LoRA key fragment, no function or class named after a family. Docstrings and
  comments may (they are documentation); user messages may name a model in prose.
* No module imports itself back through others (typing-only imports aside).
* No source file is longer than 600 lines.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from lorakit.families.registry import all_families, family_names

SOURCE = Path(__file__).resolve().parents[1] / "src" / "lorakit"
FAMILIES_DIR = SOURCE / "families"
#: kohya prefixes and path heads every family's files share; what is left of a hint after them is the family's own
_SHARED_HEADS = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "transformer.", "unet.", "text_encoder_2.",
                 "text_encoder.")


def _modules() -> dict[str, Path]:
    found = {}
    for path in SOURCE.rglob("*.py"):
        parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _outside_families() -> list[Path]:
    return [path for path in SOURCE.rglob("*.py") if FAMILIES_DIR not in path.parents]


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def _family_fragments() -> set[str]:
    """Structural names only one family's LoRA keys have (`double_blocks`, `joint_blocks`, `input_blocks`, ...)."""
    fragments = set()
    for family in all_families():
        for hint in family.lora_hints:
            for fragment in hint.fragments:
                rest = fragment
                for head in _SHARED_HEADS:
                    rest = rest.removeprefix(head)
                rest = rest.strip("._")
                if len(rest) >= 8:
                    fragments.add(rest)
    return fragments


def _violations(path: Path, names: set[str], fragments: set[str]) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = _docstrings(tree)
    where = path.relative_to(SOURCE.parent) if SOURCE in path.parents else path.name
    found = []
    family_module = re.compile(r"^lorakit\.families\.(" + "|".join(map(re.escape, names)) + r")(\.|$)")
    token = re.compile(r"(?:^|_)(" + "|".join(map(re.escape, names)) + r")(?:_|$|\d)")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and family_module.match(node.module):
            found.append(f"{where}:{node.lineno} imports {node.module}")
        elif isinstance(node, ast.Import):
            found += [f"{where}:{node.lineno} imports {a.name}" for a in node.names if family_module.match(a.name)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
            if text.strip().lower() in names:
                found.append(f"{where}:{node.lineno} names the family {text!r}")
            found += [f"{where}:{node.lineno} holds the key fragment {f!r}" for f in fragments if f in text]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and token.search(node.name.lower()):
            found.append(f"{where}:{node.lineno} defines {node.name}")
    return found


def test_nothing_outside_families_names_a_family():
    names, fragments = set(family_names()), _family_fragments()
    assert fragments, "the families' LoRA hints give key fragments to look for"
    found = [v for path in _outside_families() for v in _violations(path, names, fragments)]
    assert not found, "\n".join(found)


def test_the_check_finds_what_it_looks_for(tmp_path):
    """The rule above is not vacuous: a planted import, name, key fragment and function are each reported."""
    planted = tmp_path / "planted.py"
    planted.write_text(
        'from lorakit.families.flux.family import FluxFamily\nFAMILY = "sdxl"\nKEY = "lora_unet_double_blocks_0_img_attn"\n'
        "def load_sd3_model():\n    pass\n", encoding="utf-8")
    found = _violations(planted, set(family_names()), _family_fragments())
    assert len(found) == 4, found


def _imports(path: Path, module: str, modules: dict[str, Path]) -> set[str]:
    """The lorakit modules `module` imports at any depth of its code, except under `if TYPE_CHECKING:`."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - (0 if is_package else 1) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets.add(base)
            targets.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    resolved = set()
    for name in targets:
        parts = name.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts and ".".join(parts) != module:
            resolved.add(".".join(parts))
    return resolved


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            strong(v)
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    assert not _cycles(graph), _cycles(graph)


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_files_stay_short():
    long = {str(p.relative_to(SOURCE)): n for p in SOURCE.rglob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    assert not long, long


def test_a_family_imports_no_other_family():
    """A family is one folder: what families share lives in `families/common/`, not in a sibling's folder."""
    modules = _modules()
    names = family_names()
    found = []
    for module, path in modules.items():
        parts = module.split(".")
        if len(parts) < 3 or parts[:2] != ["lorakit", "families"] or parts[2] not in names:
            continue
        for target in _imports(path, module, modules):
            other = target.split(".")
            if other[:2] == ["lorakit", "families"] and len(other) > 2 and other[2] in names and other[2] != parts[2]:
                found.append(f"{module} imports {target}")
    assert not found, found


def test_production_code_imports_no_test_fixture_builder():
    """Tiny-model builders (`families/<name>/tiny.py`, `families/common/tiny_parts.py`) serve tests, the demo and
    benchmarks (through `registry.fixtures`), never the trainer or the tools."""
    modules = _modules()
    fixtures = {m for m in modules if m.endswith((".tiny", ".tiny_parts"))}
    found = [f"{module} imports {target}" for module, path in modules.items() if module not in fixtures
             for target in _imports(path, module, modules) & fixtures]
    assert not found, found
