"""Packaging: every third-party module the package imports is declared in pyproject.toml, and every declared
dependency has an exact pin in constraints.txt (the versions `make` installs and we test with)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "dualsynth"

# import name -> distribution name, where they differ
DISTRIBUTION_OF = {
    "PIL": "pillow",
    "png": "pypng",
    "yaml": "pyyaml",
    "skimage": "scikit-image",
    "sklearn": "scikit-learn",
    "segmentation_models_pytorch": "segmentation-models-pytorch",
}


def _normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them (case, '-', '_' and '.' alike)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"cannot read the requirement '{requirement}'"
    return _normalise(match.group(1))


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _declared() -> dict[str, str]:
    """Declared distribution -> where (dependencies or the extra that names it)."""
    project = _project()
    out = {_requirement_name(r): "dependencies" for r in project.get("dependencies", [])}
    for extra, requirements in project.get("optional-dependencies", {}).items():
        for r in requirements:
            out.setdefault(_requirement_name(r), f"extra '{extra}'")
    return out


def third_party_imports(package: Path = PACKAGE) -> dict[str, list[str]]:
    """Top-level modules imported anywhere under ``package`` (function-level imports included), outside the
    standard library and the package itself -> the files importing them."""
    out: dict[str, list[str]] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == package.name or top == "__future__":
                    continue
                files = out.setdefault(top, [])
                if str(path.relative_to(package.parent)) not in files:
                    files.append(str(path.relative_to(package.parent)))
    return out


def test_the_import_scan_sees_the_known_third_party_modules():
    found = third_party_imports()
    # top-level, function-level and optional imports alike (the scan must not miss the kinds that were missed)
    for module in ("torch", "numpy", "PIL", "png", "safetensors", "scipy", "threadpoolctl", "ray"):
        assert module in found, module
    assert not {"os", "json", "dualsynth", "__future__"} & set(found)


def test_every_imported_third_party_module_is_declared():
    declared = _declared()
    undeclared = {
        module: files for module, files in third_party_imports().items()
        if _normalise(DISTRIBUTION_OF.get(module, module)) not in declared
    }
    assert not undeclared, (
        "imported but not declared in pyproject.toml (add to [project].dependencies, or to an extra if the "
        f"import is optional; map import names in DISTRIBUTION_OF): {undeclared}"
    )


def test_an_undeclared_import_is_caught(tmp_path):
    package = tmp_path / "dualsynth"
    package.mkdir()
    (package / "new.py").write_text("import os\n\ndef f():\n    import somethingnew.sub\n    from PIL import Image\n")
    found = third_party_imports(package)
    assert set(found) == {"somethingnew", "PIL"}
    assert _normalise(DISTRIBUTION_OF.get("somethingnew", "somethingnew")) not in _declared()


def test_every_dependency_has_an_exact_pin_in_constraints():
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"constraints.txt: '{line}' is not an exact pin (name==version)"
            pins[_normalise(name.strip())] = version.strip()
    missing = sorted(name for name in _declared() if name not in pins)
    assert not missing, f"declared in pyproject.toml but not pinned in constraints.txt: {missing}"
    assert "dualsynth" not in pins
    assert (pins["torch"], pins["torchvision"]) == ("2.14.1", "0.29.1")


def test_pyproject_states_ranges_not_exact_pins():
    exact = [r for r in _project()["dependencies"] if "==" in r]
    assert not exact, f"pyproject.toml should state supported ranges; exact pins belong in constraints.txt: {exact}"
