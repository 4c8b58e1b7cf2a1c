"""pyproject.toml's `unit` extra holds what the in-process tier imports: `scripts/test.sh tests/unit` installs only
that extra, so a module that the whole suite's extras bring in by chance (jsonschema came with moto) fails there."""

import ast
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

TESTS = Path(__file__).resolve().parents[1]
OURS = {"tests", "server", "plugins", "bench"}


def module_imports(path: Path) -> set[str]:
    """The modules a file imports at its top level (imports inside functions are optional: importorskip...)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def tier_imports() -> set[str]:
    """Top-level packages the unit tests import, directly or through the tests/support modules they use."""
    files, seen, found = list((TESTS / "unit").glob("*.py")), set(), set()
    while files:
        path = files.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in module_imports(path):
            if module.startswith("tests.support."):
                files.append(TESTS / "support" / (module.removeprefix("tests.support.").split(".")[0] + ".py"))
            found.add(module.split(".")[0])
    return found - OURS - set(sys.stdlib_module_names)


def own_requirements(extras: set[str]) -> list[Requirement]:
    """pyproject.toml's dependencies and those of these extras, its own extras (image-server[sdk]) expanded."""
    project = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["project"]
    requirements, todo, done = list(map(Requirement, project["dependencies"])), set(extras), set()
    while todo:
        done.add(extra := todo.pop())
        for requirement in map(Requirement, project["optional-dependencies"][extra]):
            if canonicalize_name(requirement.name) == canonicalize_name(project["name"]):
                todo |= requirement.extras - done
            else:
                requirements.append(requirement)
    return requirements


def distributions(extras: set[str]) -> set[str]:
    """The distributions image-server with these extras needs, transitively (their installed metadata)."""
    wanted, seen, stack = set(), set(), [(r.name, frozenset(r.extras)) for r in own_requirements(extras)]
    while stack:
        name, extras = stack.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        wanted.add(canonicalize_name(name))
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # not for this platform or Python
        for requirement in map(Requirement, requires):
            if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in extras or {""}):
                continue
            stack.append((requirement.name, frozenset(requirement.extras)))
    return wanted


def test_the_unit_extra_holds_every_package_the_unit_tier_imports():
    providers = metadata.packages_distributions()
    unit = distributions({"unit"})
    missing = {
        module: providers.get(module)
        for module in tier_imports()
        if not {canonicalize_name(d) for d in providers.get(module, [module])} & unit
    }
    assert missing == {}, f"add these to the unit extra in pyproject.toml: {missing}"


def test_the_check_sees_a_package_brought_in_only_by_the_whole_suite():
    """The check itself: moto (the s3 extra) is in the test extra's closure, not in the unit one."""
    assert "moto" in distributions({"test"})
    assert "moto" not in distributions({"unit"})
