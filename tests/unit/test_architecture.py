"""The rules docs/ARCHITECTURE.md promises: server/ never imports plugins/, plugins/ import of server/ only the
plugins' contract, and no function is too long. (Complexity is ruff's C901, at most 10, in pyproject.toml.)"""

import ast
from pathlib import Path

from server.hooks import PLUGIN_API

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 50


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_server_never_imports_plugins():
    offenders = {
        str(path.relative_to(ROOT)): sorted(n for n in imported(path) if n.split(".")[0] == "plugins")
        for path in modules("server")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_plugins_import_of_server_only_the_modules_of_the_plugin_contract():
    """server/hooks.py is the plugins' view of the engine; nothing else of server/engines/ (nor the service, the
    scheduler, the app) is theirs to import."""
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            n for n in imported(path) if n.split(".")[0] == "server" and n not in PLUGIN_API
        )
        for path in modules("plugins")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_function_is_longer_than_fifty_lines():
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for package in ("server", "plugins")
        for path in modules(package)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    assert long == []


# Exceptions whose text this project writes itself, in words about what the caller sent or what was decided.
OWN_WORDS = {"APIError", "LoRAError", "UnsafeURL", "ConfigError", "_NotJSON", "JSONDecodeError", "ValidationError",
             "CostlyImage", "UnreadableImage"}  # fmt: skip


def _caught(handler: ast.ExceptHandler) -> set[str]:
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return {t.attr if isinstance(t, ast.Attribute) else getattr(t, "id", "?") for t in types}


def _logged(node: ast.AST) -> set[int]:
    """The nodes inside log calls and SystemExit (the operator's eyes, not a caller's)."""
    inside: set[int] = set()
    for call in ast.walk(node):
        func = getattr(call, "func", None)
        owner = getattr(getattr(func, "value", None), "id", None)
        if owner in ("log", "logging") or getattr(func, "id", None) == "SystemExit":
            inside.update(id(n) for n in ast.walk(call))
    return inside


def _words_of(name: str, node: ast.AST) -> bool:
    """`node` turns the exception called `name` into text: f"{exc}", str(exc), repr(exc), type(exc), "%s" % exc."""
    named = lambda n: isinstance(n, ast.Name) and n.id == name  # noqa: E731
    if isinstance(node, ast.FormattedValue):
        return named(node.value)
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("str", "repr", "type", "format"):
        return any(named(a) for a in node.args)
    return isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod) and any(named(n) for n in ast.walk(node.right))


def test_no_exception_text_reaches_a_caller():
    """Issue 20, rule 7: an error message is built from what the caller sent and what the server decided, never
    from a library's exception (an OSError's path, Pillow's object addresses, SGLang's traceback): those go to
    the log. Inside an `except ... as exc` that catches anything but our own errors, `exc` becomes text only in
    a log call or SystemExit."""
    leaks = []
    for package in ("server", "plugins"):
        for path in modules(package):
            for handler in ast.walk(ast.parse(path.read_text())):
                if not isinstance(handler, ast.ExceptHandler) or not handler.name or _caught(handler) <= OWN_WORDS:
                    continue
                allowed = _logged(handler)
                leaks += [
                    f"{path.relative_to(ROOT)}:{node.lineno}"
                    for stmt in handler.body
                    for node in ast.walk(stmt)
                    if id(node) not in allowed and _words_of(handler.name, node)
                ]
    assert leaks == []
