"""The wheel a user installs holds every file the package reads at run time, and caps every dependency."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel .` builds from this checkout (with the installed setuptools: no download).

    It builds from a copy, so no `build/` folder left in the checkout (stale files included) reaches the wheel.
    """
    source, out = tmp_path_factory.mktemp("source") / "moma-hf", tmp_path_factory.mktemp("wheel")
    skip = shutil.ignore_patterns(".git", "build", "dist", "outputs", "runs", "__pycache__", "*.egg-info", ".*cache")
    shutil.copytree(REPO, source, ignore=skip)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(out)], check=True, timeout=600, cwd=out)
    (found,) = out.glob("moma_hf-*.whl")
    return found


def test_wheel_ships_the_card_templates_and_metric_scripts(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {f"moma_hf/model_cards/{p.name}" for p in (REPO / "model_cards").glob("*.j2")}
    metric_dir = REPO / "moma_hf" / "evaluation" / "metric_scripts"
    metrics = {p.relative_to(REPO).as_posix() for p in metric_dir.glob("*/*.py")}
    assert templates and templates <= names, templates - names
    assert metrics and metrics <= names, metrics - names


@pytest.mark.slow
def test_installed_wheel_finds_its_template_and_metrics_outside_the_repository(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import moma_hf.evaluation.model_card as card, moma_hf.evaluation.metric_scripts as metrics\n"
        "print(card.template_path()); print(metrics.load_metric('accuracy').compute("
        "predictions=[0, 1, 1], references=[0, 1, 0])['accuracy'])\n"
    )
    # Run from a folder outside the checkout, with the unpacked wheel first on the path, as an installed copy.
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    template, accuracy = result.stdout.split()[-2:]
    assert Path(template) == site / "moma_hf" / "model_cards" / "student_card.md.j2"
    assert float(accuracy) == pytest.approx(2 / 3)


def test_every_dependency_has_an_upper_bound(wheel):
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requirements = re.findall(r"^Requires-Dist: (.+)$", metadata, flags=re.M)
    assert len(requirements) > 10
    unbounded = [r for r in requirements if not re.search(r"<=?\s*\d", r)]
    assert not unbounded, f"cap these below their next major version in setup.py: {unbounded}"
