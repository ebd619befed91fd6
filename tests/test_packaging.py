"""nftrace as pip, pipx or a wheel install it: the wheel built from the checkout holds every
subpackage and every scenario file, and the scenarios are read from the installed package,
whatever the working directory. No kernel here; .ci/run installs the wheel into an empty venv
and runs `nftrace demo` for real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

# What a build writes next to the sources, and what is no part of them.
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout (a build writes into its source tree, and the
    checkout may be read-only), with the build backend already installed: no network."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "nftrace"
    shutil.copytree(REPO, source, symlinks=True, ignore=NOT_SOURCES)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(work / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (path,) = (work / "dist").glob("nftrace-*.whl")
    return path


def wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_the_wheel_holds_every_module_of_every_subpackage(wheel):
    modules = {path.relative_to(REPO).as_posix() for path in (REPO / "nftrace").rglob("*.py")
               if "__pycache__" not in path.parts}
    assert {"nftrace/cli.py", "nftrace/lab/lab.py", "nftrace/kernel/__init__.py"} <= modules
    assert modules - wheel_files(wheel) == set()


def test_the_wheel_holds_every_scenario_file(wheel):
    scenarios = {f"nftrace/rules/{path.name}" for path in (REPO / "rules").iterdir() if path.is_file()}
    assert len(scenarios) >= 16
    assert scenarios - wheel_files(wheel) == set()


def test_the_wheels_command_enters_through_the_module_that_imports_nothing_heavy(wheel):
    # nftrace/__main__.py holds Ctrl-C as one line while the command line is imported.
    with zipfile.ZipFile(wheel) as archive:
        entry_points = next(archive.read(name).decode() for name in archive.namelist()
                            if name.endswith(".dist-info/entry_points.txt"))
    assert "nftrace = nftrace.__main__:main" in entry_points


def test_an_installed_wheel_reads_its_own_scenarios_from_any_directory(wheel, tmp_path):
    site = tmp_path / "site-packages"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "NFTRACE_RULES"}
    env["PYTHONPATH"] = str(site)
    shown = subprocess.run([sys.executable, "-c", "import nftrace.lab.lab as lab; print(lab.__file__); "
                            "print(lab.rules_dir()); print(*lab.scenario_names()); "
                            "print(lab.find_scenario('nat-router').ruleset)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    module, rules, names, ruleset = shown.stdout.splitlines()
    assert module.startswith(str(site)) and rules == str(site / "nftrace" / "rules")
    assert {"nat-router", "host-firewall", "docker", "legacy-iptables"} <= set(names.split())
    assert ruleset == str(site / "nftrace" / "rules" / "nat-router.nft")
