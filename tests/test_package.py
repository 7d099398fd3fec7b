"""raycxr as an installed package: a wheel built from this checkout, installed into a new virtual
environment (its dependencies taken from this one's site-packages, not downloaded again), run from
a folder outside the checkout."""

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the bin/ folder of a new venv with it installed)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"  # what the sdist holds, copied: building writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("raycxr", "search_spaces"):  # search_spaces/ is mapped into the package at build time
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(base / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((base / "dist").glob("raycxr-*.whl"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python*/site-packages"))
    # the dependencies: this environment's packages, after the new venv's own (so its raycxr wins)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, capture_output=True, timeout=300)
    return wheel, venv / "bin"


def _run(bin_dir: Path, *argv, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / argv[0]), *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_wheel_holds_the_package_data_and_nothing_else(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    from raycxr.config import list_spaces

    spaces = sorted(p.name for p in (ROOT / "search_spaces").glob("*.yaml"))  # the top-level folder
    assert spaces and [f"{s}.yaml" for s in list_spaces()] == spaces
    assert {f"raycxr/search_spaces/{s}" for s in spaces} <= set(names)
    assert "raycxr/templates/report.html.j2" in names
    # pyproject lists the packages (a mapped folder rules out packages.find): none may be left out
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "raycxr").rglob("*.py")}
    assert modules <= set(names), sorted(modules - set(names))
    assert not [n for n in names if n.startswith(("tests/", "scripts/", "sample/", "search_spaces/"))]


def test_the_installed_command_finds_its_bundled_spaces(installed, tmp_path):
    _, bin_dir = installed
    from raycxr import __version__

    version = _run(bin_dir, "raycxr", "--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"raycxr {__version__}"
    help_text = _run(bin_dir, "raycxr", "search", "--help", cwd=tmp_path)
    assert help_text.returncode == 0 and "demo" in help_text.stdout
    # the space loads from the installed package: what fails is the (missing) data, not the space
    run = _run(bin_dir, "raycxr", "search", "--space", "demo", "--data", str(tmp_path / "none"), cwd=tmp_path)
    assert run.returncode == 2 and "has no manifest.json" in run.stderr, run.stderr
    code = ("import raycxr, raycxr.config as c; from importlib.resources import files; "
            "print(raycxr.__file__); print(files('raycxr.search_spaces') / 'demo.yaml'); "
            "print(c.load_space('demo').trials); print((files('raycxr') / 'templates' / 'report.html.j2').is_file())")
    py = _run(bin_dir, "python", "-c", code, cwd=tmp_path)
    assert py.returncode == 0, py.stderr
    where, space, trials, template = py.stdout.split()
    assert Path(where).is_relative_to(bin_dir.parent) and Path(space).is_relative_to(bin_dir.parent)  # not the checkout
    assert int(trials) > 0 and template == "True"
