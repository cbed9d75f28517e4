"""The package dependency rule from docs/DESIGN.md, checked on the source."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = {"avcloud", "onboard", "cloudside", "optimizer", "datasets"}
# Which other top-level packages each package may import (the avcloud kernel is always allowed).
ALLOWED_PEERS = {
    "optimizer": set(),
    "datasets": set(),
    "cloudside": set(),
    "onboard": {"optimizer"},
}
# Modules of avcloud that orchestrate everything; all other avcloud modules are the kernel.
AVCLOUD_TOP_LEVEL = ("avcloud.cli", "avcloud.__main__", "avcloud.commands", "avcloud.replay",
                     "avcloud.fleet", "avcloud.profiler", "avcloud.training")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_top_level(module: str) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in AVCLOUD_TOP_LEVEL)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from avcloud import replay` imports a submodule by name.
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found


def violations_in(path: Path) -> list[str]:
    importer = module_name(path)
    importer_package = importer.split(".")[0]
    problems = []
    for line, imported in imported_modules(path):
        imported_package = imported.split(".")[0]
        if imported_package not in PROJECT_PACKAGES or imported_package == importer_package == "avcloud":
            if importer_package == "avcloud" and not is_top_level(importer) and is_top_level(imported):
                problems.append(f"{path.relative_to(REPO_ROOT)}:{line}: kernel module imports {imported}")
            continue
        if imported_package == importer_package:
            continue
        if imported_package == "avcloud":
            if is_top_level(imported):
                problems.append(f"{path.relative_to(REPO_ROOT)}:{line}: imports top-level {imported}")
            continue
        if importer_package == "avcloud":
            if not is_top_level(importer):
                problems.append(f"{path.relative_to(REPO_ROOT)}:{line}: kernel module imports {imported}")
            continue
        if imported_package not in ALLOWED_PEERS[importer_package]:
            problems.append(f"{path.relative_to(REPO_ROOT)}:{line}: {importer_package} may not import {imported}")
    return problems


def project_sources() -> list[Path]:
    return sorted(p for package in PROJECT_PACKAGES for p in (REPO_ROOT / package).rglob("*.py"))


def test_every_package_follows_the_import_rule():
    problems = [problem for path in project_sources() for problem in violations_in(path)]
    assert problems == []


@pytest.mark.parametrize(
    ("relative_path", "source", "expected_fragment"),
    [
        ("optimizer/bad.py", "import datasets.traces\n", "optimizer may not import datasets.traces"),
        ("onboard/bad.py", "from cloudside import service\n", "onboard may not import cloudside"),
        ("avcloud/bad.py", "from avcloud.replay import simulator\n", "kernel module imports avcloud.replay"),
        ("datasets/bad.py", "from avcloud import profiler\n", "imports top-level avcloud.profiler"),
    ],
)
def test_the_checker_catches_forbidden_imports(tmp_path, monkeypatch, relative_path, source, expected_fragment):
    fake_root = tmp_path
    target = fake_root / relative_path
    target.parent.mkdir(parents=True)
    target.write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "REPO_ROOT", fake_root)
    assert any(expected_fragment in problem for problem in violations_in(target))


def test_onboard_may_import_optimizer(tmp_path, monkeypatch):
    target = tmp_path / "onboard" / "ok.py"
    target.parent.mkdir(parents=True)
    target.write_text("from optimizer.allocators import get_allocator\nfrom avcloud.types import Option\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO_ROOT", tmp_path)
    assert violations_in(target) == []
