"""The package's shape, checked from its source: data flows one way, and no module reaches into another's privates.

These rules are in DESIGN.md section 2 and issue 15; a change that breaks one fails here, naming the import.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "moma_hf"

# Each part of the package may import only from its own layer or a lower one: data in, networks and the small
# modules, the models, training, results out, and the commands that run it all.
LAYERS = {
    "moma_hf.data": 0,
    "moma_hf.modules": 0,
    "moma_hf.losses": 0,
    "moma_hf.configuration_distillation": 0,
    "moma_hf.networks": 1,
    "moma_hf.modeling_distillation": 2,
    "moma_hf.modeling_moma": 2,
    "moma_hf.modeling_baselines": 2,
    "moma_hf.modeling_auto": 2,
    "moma_hf.training": 3,
    "moma_hf.evaluation": 3,
    "moma_hf.training_args": 4,
    "moma_hf.trainer_distillation": 4,
    "moma_hf.hub": 5,
    "moma_hf.commands": 6,
    "moma_hf": 6,  # __init__: the public API re-exports every layer
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_modules() -> list[Path]:
    # metric scripts are loaded by `evaluate` from their path, not imported as part of the package
    return sorted(p for p in PACKAGE.rglob("*.py") if "metric_scripts" not in p.parts[:-1] or p.name == "__init__.py")


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """`(imported module, imported names, line)` for every import in `path`, relative ones resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [alias.name for alias in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
    return found


def _layer(module: str) -> int | None:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    return None


def test_no_module_imports_another_modules_private_names():
    offenders = []
    scripts = sorted((REPO / "benchmarks").glob("*.py")) + sorted((REPO / "examples").glob("*.py"))
    for path in _package_modules() + scripts:
        for target, names, line in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:  # of this package or of another library: make it public, or wrap the one use in one place
                offenders.append(f"{path.relative_to(REPO)}:{line} imports {private} from {target}")
    assert not offenders, "\n".join(offenders)


def test_every_package_module_has_a_layer():
    unplaced = [_module_name(p) for p in _package_modules() if _layer(_module_name(p)) is None]
    assert not unplaced, f"add these modules to LAYERS: {unplaced}"


def test_data_flows_one_way():
    """A module imports only from its own layer or a lower one: data knows no model, models no training loop."""
    upward = []
    for path in _package_modules():
        source = _module_name(path)
        for target, names, line in _imports(path):
            if target == "moma_hf" and names == ["__version__"]:
                continue  # the version string, read lazily, is no dependency on the layers above
            if target.startswith("moma_hf") and (_layer(target) or 0) > (_layer(source) or 0):
                upward.append(f"{path.relative_to(REPO)}:{line} ({source}, layer {_layer(source)}) imports "
                              f"{target} (layer {_layer(target)})")
    assert not upward, "\n".join(upward)


def test_the_library_never_imports_a_script_or_a_benchmark():
    for path in _package_modules():
        for target, _, line in _imports(path):
            assert target.split(".")[0] not in ("examples", "benchmarks", "tests"), f"{path}:{line} imports {target}"


@pytest.mark.parametrize("script", sorted((REPO / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_benchmarks_call_the_package_only(script):
    """Benchmarks import no other benchmark or example and do not edit sys.path: the package is their only API."""
    siblings = {p.stem for p in (REPO / "benchmarks").glob("*.py")} | {p.stem for p in (REPO / "examples").glob("*.py")}
    for target, _, line in _imports(script):
        assert target.split(".")[0] not in siblings | {"examples", "benchmarks"}, f"{script.name}:{line}: {target}"
    source = script.read_text(encoding="utf-8")
    assert "sys.path" not in source and "spec_from_file_location" not in source, script.name


def test_the_top_level_holds_about_a_dozen_modules():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 12, modules
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert folders == ["commands", "data", "evaluation", "modules", "networks", "training"], folders


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    """The README's library example is what a newcomer copies first: run it, shortened to two steps."""
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) == 1, "the README should hold exactly one Python example"
    shortened = {'output_dir="out"': f'output_dir="{tmp_path / "out"}"', "max_steps=500": "max_steps=2",
                 "queue_size=4096": 'queue_size=64, report_to="none", save_strategy="no"'}
    code = blocks[0]
    for old, new in shortened.items():
        assert old in code, f"the README example changed; update this test's shortening of {old!r}"
        code = code.replace(old, new)
    monkeypatch.chdir(REPO)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "model.safetensors").is_file()
