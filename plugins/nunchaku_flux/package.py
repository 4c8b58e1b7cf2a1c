"""Is the installed `nunchaku` MIT HAN Lab's Nunchaku? Found out from its files, without importing it.

`pip install nunchaku` installs an unrelated library of that name (Bayesian
change-point detection, 0.16.x); the real one ships only as GitHub wheels,
built per torch and Python version (nunchaku-1.2.1+cu12.8torch2.10-cp311-...).
Importing the wrong one runs its code (and fails on its dependencies), and
importing the real one against another torch fails deep in its extension, so
the check reads the package's files and its version instead.
"""

import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass

RELEASES = "https://github.com/nunchaku-ai/nunchaku/releases"
EXAMPLE_WHEEL = "nunchaku-1.2.1+cu12.8torch2.10-cp311-cp311-linux_x86_64.whl"
_TORCH_TAG = re.compile(r"torch(\d+\.\d+)")


@dataclass(frozen=True)
class Package:
    kind: str  # "absent", "unrelated" or "real"
    version: str | None = None
    location: str | None = None

    @property
    def built_for_torch(self) -> str | None:
        """The torch major.minor in the wheel's local version tag ("+cu12.8torch2.10" -> "2.10")."""
        match = _TORCH_TAG.search(self.version or "")
        return match[1] if match else None


def detect() -> Package:
    try:
        spec = importlib.util.find_spec("nunchaku")  # the top-level lookup runs none of the package's code
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return Package("absent")
    folders = list(spec.submodule_search_locations)
    version = _version()
    kind = "real" if _has_flux_model(folders) and _has_extension(folders) else "unrelated"
    return Package(kind, version, folders[0])


def _version() -> str | None:
    try:
        return importlib.metadata.version("nunchaku")
    except importlib.metadata.PackageNotFoundError:
        return None


def _has_flux_model(folders: list[str]) -> bool:
    return any(os.path.isfile(os.path.join(d, "models", "transformers", "transformer_flux.py")) for d in folders)


def _has_extension(folders: list[str]) -> bool:
    """The compiled CUDA extension, _C.<abi>.so (or .pyd on Windows)."""
    return any(
        name.startswith("_C") and name.endswith((".so", ".pyd"))
        for d in folders
        if os.path.isdir(d)
        for name in os.listdir(d)
    )


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def install_hint(torch_version: str, python: tuple[int, int]) -> str:
    torch_mm = _major_minor(torch_version)
    tag = f"cp{python[0]}{python[1]}"
    return (
        f"Install the wheel built for torch {torch_mm} and Python {python[0]}.{python[1]} ({tag}) from {RELEASES} "
        f"(names look like {EXAMPLE_WHEEL}); wheels exist for torch 2.8 to 2.11 as of v1.2.1, so torch "
        f"{torch_mm} may need a source build or a matching torch."
    )


def problem(package: Package, torch_version: str, python: tuple[int, int]) -> str | None:
    """Why this package cannot run Nunchaku's FLUX, or None when it looks right."""
    hint = install_hint(torch_version, python)
    if package.kind == "absent":
        return (
            "the Nunchaku package is not installed. It is not on PyPI (`pip install nunchaku` installs an unrelated "
            f"library of the same name). {hint}"
        )
    if package.kind == "unrelated":
        return (
            f"the installed package named 'nunchaku' ({package.version or 'unknown version'}, {package.location}) is "
            "not MIT HAN Lab's Nunchaku: it has no FLUX transformer module and no CUDA extension (detected from its "
            "files, without importing it; PyPI's 'nunchaku' is an unrelated change-point library). "
            f"Run `pip uninstall nunchaku`. {hint}"
        )
    built_for = package.built_for_torch
    if built_for and built_for != _major_minor(torch_version):
        return (
            f"nunchaku {package.version} is built for torch {built_for}, but torch {torch_version} is installed: "
            f"its CUDA extension will not load. {hint}"
        )
    return None


def package_aside(package: Package) -> str:
    """One clause on a package that is not the real Nunchaku, for refusals whose main reason is elsewhere."""
    if package.kind == "absent":
        return "the Nunchaku package is not installed either"
    if package.kind == "unrelated":
        return "the installed 'nunchaku' is an unrelated PyPI library, not MIT HAN Lab's Nunchaku"
    return ""
