"""How kvlab's modules import each other: no cycle, torch only where a model runs, and no function-level import that
only dodges a cycle.

The graph is read from the source (every module's top-level imports, ``if TYPE_CHECKING:`` blocks left out) and
checked by running: each pricing path in a fresh interpreter, and every module imported in one interpreter in a fixed
order.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "kvlab"
# third-party packages worth keeping out of a module that does not need them (slow to import, or optional)
HEAVY = {"torch", "matplotlib", "transformers", "scipy", "numpy", "gguf", "tokenizers", "jinja2", "psutil"}
# function-level kvlab imports kept for a reason other than a heavy dependency (importer, imported): why
ALLOWED_LAZY = {
    ("kvlab.costs.calculator", "kvlab.resolve"): "`import kvlab` imports the calculator; the presets and families "
                                                 "load only when a name is priced",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return modules()[name].name == "__init__.py"


def _resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The modules an import statement loads: kvlab modules by name, other packages by their top-level name."""
    if isinstance(node, ast.Import):
        out = []
        for a in node.names:
            out.append(a.name if a.name in modules() else a.name.split(".")[0])
        return out
    if node.level:
        base = importer.split(".") if _is_package(importer) else importer.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("kvlab"):
        return [target.split(".")[0]]
    subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules()]
    attrs = [a.name for a in node.names if f"{target}.{a.name}" not in modules()]
    return subs + ([target] if attrs or not subs else [])


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(name: str) -> tuple[list[str], list[tuple[int, str]]]:
    """(top-level imports, [(line, module) of imports inside a function or class body]) of module ``name``."""
    tree = ast.parse(modules()[name].read_text())
    top: list[str] = []
    nested: list[tuple[int, str]] = []

    def walk(node: ast.AST, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _resolve(name, child):
                    (nested.append((child.lineno, target)) if inside else top.append(target))
            walk(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)))

    walk(tree, False)
    return top, nested


@cache
def graph() -> dict[str, list[str]]:
    """kvlab module -> the kvlab modules and third-party packages its top-level imports load."""
    return {m: _imports(m)[0] for m in modules()}


@cache
def closure(name: str) -> frozenset[str]:
    """Everything importing ``name`` loads: its parent packages, their imports, and so on."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        if m in modules():
            todo += graph()[m]
            todo += [".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)]  # parent packages first
    return frozenset(seen)


def cycles() -> list[list[str]]:
    """Strongly connected groups of more than one kvlab module in the top-level import graph (Tarjan)."""
    g = {m: [t for t in ts if t in modules() and t != m] for m, ts in graph().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for m in g:
        if m not in index:
            visit(m)
    return out


def test_the_import_graph_has_no_cycle() -> None:
    assert cycles() == []


def test_a_cycle_in_the_graph_would_be_found(monkeypatch: pytest.MonkeyPatch) -> None:
    g = dict(graph())
    g["kvlab.config"] = [*g["kvlab.config"], "kvlab.costs.calculator"]  # calculator -> config -> calculator
    monkeypatch.setattr(sys.modules[__name__], "graph", lambda: g)
    assert any({"kvlab.config", "kvlab.costs.calculator"} <= set(c) for c in cycles())


def misplaced(m: str, nested: list[tuple[int, str]]) -> list[str]:
    """The function-level imports of module ``m`` (``[(line, module)]``) that belong at the top: a standard-library
    module, or a kvlab module that keeps no heavy package out of ``m`` (and is not in ``ALLOWED_LAZY``)."""
    bad = []
    for line, target in nested:
        where = f"{modules()[m].relative_to(ROOT)}:{line} imports {target}"
        if target in sys.stdlib_module_names:
            bad.append(f"{where}: a standard-library module, import it at the top")
        elif target.startswith("kvlab") and (m, target) not in ALLOWED_LAZY and not (closure(target) - closure(m)) & HEAVY:
            bad.append(f"{where}: it keeps nothing heavy out of {m} ({sorted(closure(m) & HEAVY)} already loaded, or it "
                       "loads none): import it at the top")
    return bad


def test_function_level_imports_each_keep_a_heavy_dependency_out() -> None:
    """A function-level import of a kvlab module is there to keep a heavy package (torch, matplotlib...) out of its
    importer (e.g. the CLI's verbs import the model when they run); one that brings nothing heavy the importer does
    not already load only dodges a cycle, or nothing: it belongs at the top. Standard-library imports belong at the
    top too."""
    assert [b for m in modules() for b in misplaced(m, _imports(m)[1])] == []


def test_the_rule_flags_a_pointless_function_level_import() -> None:
    assert misplaced("kvlab.cli.calc", [(1, "kvlab.model")]) == []  # keeps torch out of the CLI: fine
    assert misplaced("kvlab.model", [(1, "kvlab.units")])  # torch-free, and model already loads torch
    assert misplaced("kvlab.cli.calc", [(1, "kvlab.units")])  # loads nothing heavy
    assert misplaced("kvlab.config", [(1, "json")])  # standard library


def test_every_module_imports_in_one_interpreter_in_a_fixed_order() -> None:
    names = sorted(m for m in modules() if not m.endswith("__main__"))  # __main__ runs the CLI
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\nprint(len(sys.argv) - 1)"
    out = subprocess.run([sys.executable, "-c", code, *names], check=False, capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [str(len(names))]


# -- what needs no torch ------------------------------------------------------------------------------------------
_RUN = """
import contextlib, io, json, sys
PRE
from kvlab.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "out": out.getvalue(), "torch": "torch" in sys.modules,
                  "heavy": sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)}))
"""


def _run_cli(*argv: str, pre: str = "") -> dict:
    """``kvlab ARGV`` in a fresh interpreter (after running ``pre``): its exit code, output and the heavy packages
    it loaded."""
    code = f"HEAVY = {sorted(HEAVY)!r}\n{_RUN.replace('PRE', pre)}"
    out = subprocess.run([sys.executable, "-c", code, *argv], check=False, capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint directory holding only a Qwen3 config.json (what calc reads; no weights)."""
    d = tmp_path_factory.mktemp("qwen3")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 1000, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": True}))
    return d


@pytest.mark.parametrize("argv", [
    ("calc", "qwen3-8b"), ("calc", "deepseek-v3", "--context", "128k", "--json"), ("calc", "gemma-4-e2b"),
    ("calc", "deepseek-v4-flash", "--kv-quant", "int4"), ("compare", "qwen3-8b", "llama-3.1-8b", "zaya1-8b"),
    ("fit", "qwen3-8b", "--memory", "24GiB"), ("inspect", "qwen3-8b"), ("presets",),
])
def test_pricing_a_preset_imports_no_torch(argv: tuple[str, ...]) -> None:
    r = _run_cli(*argv)
    assert r["rc"] in (0, None) and r["out"].strip(), r
    assert not r["torch"] and r["heavy"] == [], r


def test_pricing_a_checkpoint_config_imports_no_torch(hf_dir: Path) -> None:
    r = _run_cli("calc", str(hf_dir), "--context", "4k", "--json")
    assert json.loads(r["out"])["params_total"] > 0
    assert not r["torch"], r


def test_pricing_a_gguf_header_imports_no_torch() -> None:
    from kvlab.models import is_named, model_file

    try:
        model_file("smollm2-135m") if is_named("smollm2-135m") else pytest.skip("no named GGUF model")
    except ValueError as e:  # its package is not installed
        pytest.skip(str(e))
    r = _run_cli("calc", "smollm2-135m", "--context", "8k", "--json")
    assert json.loads(r["out"])["kv_cache_bytes"] > 0
    assert not r["torch"], r


def test_the_probe_sees_torch_when_it_is_loaded() -> None:
    r = _run_cli("presets", pre="import kvlab.model")
    assert r["torch"] and "torch" in r["heavy"], r
