"""The layering rules, checked on every module's imports: core never imports api or e2b; engine never
imports core, api or store; api and e2b never import the agent's wire protocol; store imports no layer
above it; the guest agent imports nothing of kiln outside kiln.agent."""

import ast
from pathlib import Path

KILN = Path(__file__).resolve().parents[2] / "kiln"

FORBIDDEN = {
    "kiln.core": ["kiln.api", "kiln.e2b"],
    "kiln.engine": ["kiln.core", "kiln.api", "kiln.store"],
    "kiln.api": ["kiln.agent.protocol"],
    "kiln.e2b": ["kiln.agent.protocol"],  # the E2B surface talks to agents through their client, as the API does
    "kiln.store": ["kiln.core", "kiln.api", "kiln.engine"],
    "kiln.states": ["kiln.core", "kiln.api", "kiln.engine", "kiln.store"],
}
GUEST = [
    "kiln/agent/guest.py",
    "kiln/agent/files.py",
    "kiln/agent/ports.py",
    "kiln/agent/protocol.py",
    "kiln/agent/watch.py",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(KILN.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, mod: str) -> set[str]:
    """Every module a file imports (relative imports resolved), including inside functions."""
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}
    return found


def violations(path: Path, mod: str | None = None) -> list[str]:
    mod = mod or module_name(path)
    bad = []
    for layer, banned in FORBIDDEN.items():
        if mod == layer or mod.startswith(layer + "."):
            for imported in sorted(imports(path, mod)):
                bad += [f"{mod} imports {imported}" for b in banned if imported == b or imported.startswith(b + ".")]
    return bad


def test_layering_rules_hold():
    files = sorted(KILN.rglob("*.py"))
    assert len(files) > 40
    problems = [v for f in files for v in violations(f)]
    assert problems == []


def test_guest_agent_imports_only_itself_and_the_stdlib():
    for rel in GUEST:
        path = KILN.parent / rel
        kiln_imports = {
            i for i in imports(path, module_name(path)) if i.startswith("kiln") and not i.startswith("kiln.agent")
        }
        assert kiln_imports == set(), rel


def test_the_checker_sees_a_violation(tmp_path):
    # the rules above are not vacuous: a core module importing the API is caught
    probe = tmp_path / "probe.py"
    probe.write_text("from ..api import deps\n")
    assert violations(probe, "kiln.core.probe") == [
        "kiln.core.probe imports kiln.api",
        "kiln.core.probe imports kiln.api.deps",
    ]


def runtime_imports(path: Path) -> set[str]:
    """kiln modules a file imports when it is loaded (top level, outside TYPE_CHECKING)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        for n in node.body if isinstance(node, ast.Try) else [node]:
            if isinstance(n, ast.ImportFrom):
                base = package.split(".")
                target = (
                    ".".join(base[: len(base) - (n.level - 1)] + ([n.module] if n.module else []))
                    if n.level
                    else n.module or ""
                )
                for a in n.names:
                    sub = f"{target}.{a.name}"
                    found.add(sub if (KILN.parent / (sub.replace(".", "/") + ".py")).exists() else target)
            elif isinstance(n, ast.Import):
                found |= {a.name for a in n.names}
    return {f for f in found if f.startswith("kiln")}


def test_no_import_cycles():
    graph = {module_name(p): runtime_imports(p) for p in KILN.rglob("*.py")}
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in graph.get(node, ()):
            if state.get(dep) == "open":
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert cycles == []
