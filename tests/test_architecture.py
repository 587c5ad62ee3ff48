"""The architecture's rules, checked on the source: the import graph has no cycle, the method contract
(``hotswap.methods.api``) imports neither serving nor training, a method folder imports only the contract, and
serve/ names no method."""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotswap.methods import registered

ROOT = Path(__file__).resolve().parent.parent
MAPPED = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
CORE = {"hotswap.errors", "hotswap.formats", "hotswap.fsutil", "hotswap.basemodel"}  # below every package
LORA_FAMILY = {"adalora", "dylora", "plora"}  # publish LoRA artifacts: they reuse LoRA's reader and writer


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in MAPPED.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            if not any(p in MAPPED.values() for p in path.relative_to(ROOT).parts[1:-1]):  # not another mapping
                found.setdefault(name, path)
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[str]:
    """The hotswap modules ``name`` imports, anywhere in it (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        yield from (t for t in targets if t in MODULES and t != name)


GRAPH = {name: set(_imports(name, path)) for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle() -> None:
    assert len(MODULES) > 100  # the whole tree was read
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_method_contract_imports_neither_serving_nor_training_nor_a_method() -> None:
    for name in (m for m in MODULES if m.startswith("hotswap.methods.api")):
        bad = {t for t in GRAPH[name] if t.startswith("hotswap.") and not t.startswith("hotswap.methods.api")} - CORE
        assert not bad, f"{name} imports {sorted(bad)}"


@pytest.mark.parametrize(
    "folder",
    sorted({m.split(".")[2] for m in MODULES if m.startswith("hotswap.methods.") and m.count(".") >= 2} - {"api"}),
)
def test_a_method_folder_imports_only_the_contract(folder: str) -> None:
    own = f"hotswap.methods.{folder}"
    allowed = {"hotswap.methods.lora"} if folder in LORA_FAMILY else set()
    for name in (m for m in MODULES if m == own or m.startswith(f"{own}.")):
        bad = {
            t
            for t in GRAPH[name]
            if t not in CORE
            and not t.startswith(("hotswap.methods.api", own))
            and not any(t == a or t.startswith(f"{a}.") for a in allowed)
        }
        assert not bad, f"{name} imports {sorted(bad)}: a method folder imports only hotswap.methods.api"


def _method_words() -> list[str]:
    """How code would name a registered method: its name and title as words, and "<name> tuning". Bare names that
    are also serving words count only as "<name> tuning" / ``<name>_*``."""
    generic = {"prefix", "prompt", "proxy"}  # also a server's words: prefix caching, a prompt, Ray's proxy
    words = []
    for spec in registered().values():
        for name in {spec.name, spec.title or spec.name}:
            stem = re.escape(name.lower()).replace("\\-", "[-_ ]?")
            words.append(rf"\b{stem}[-_ ]tuning\b")
            if name.lower() not in generic:
                words.append(rf"\b{stem}\b")
    return words


def test_serve_names_no_method() -> None:
    """serve/ reaches methods only through the registry of specs and the kinds they register."""
    pattern = re.compile("|".join(_method_words()), re.IGNORECASE)
    hits = []
    for name, path in MODULES.items():
        if name.startswith("hotswap.serve"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if m := pattern.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {m.group(0)!r} in {line.strip()}")
    assert not hits, "serve/ names methods:\n" + "\n".join(hits)


@pytest.mark.parametrize(
    ("layer", "below"),
    [
        ("hotswap.serve.model", ("hotswap.serve.engine", "hotswap.serve.api")),
        ("hotswap.serve.engine", ("hotswap.serve.api",)),
    ],
)
def test_serve_layers_import_downwards_only(layer: str, below: tuple[str, ...]) -> None:
    """serve/api uses serve/engine, which drives serve/model; never the other way."""
    for name in (m for m in MODULES if m.startswith(f"{layer}.")):
        bad = sorted(t for t in GRAPH[name] if t.startswith(below))
        assert not bad, f"{name} imports {bad}"
