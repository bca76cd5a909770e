"""The distribution installs ONE import namespace, lit_meta, with datamodules/ and callbacks/ inside it."""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_one_namespace_into_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], check=True, cwd=tmp_path)
    (wheel,) = dist.glob("lit_meta-*.whl")
    top_level = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert top_level == {"lit_meta", wheel.name.split("-py3")[0] + ".dist-info"}, top_level
    names = zipfile.ZipFile(wheel).namelist()
    assert "lit_meta/datamodules/omniglot.py" in names and "lit_meta/callbacks/__init__.py" in names
    for package in REPO.glob("lit_meta/**/__init__.py"):  # every subpackage (rl, envs, ...) is listed in pyproject
        assert package.relative_to(REPO).as_posix() in names, f"{package.parent.name} is missing from the wheel"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    # The fresh venv borrows this environment's dependencies (torch, lightning, ...) through a plain path
    # entry; that path's own .pth files (this repo's editable install) are NOT processed.
    venv_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip()
    Path(venv_site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    check = (
        "import importlib.util, lit_meta, lit_meta.datamodules as d, lit_meta.callbacks as c\n"
        "from lit_meta.datamodules import OmniglotDataModule, SinusoidDataModule\n"
        f"assert lit_meta.__file__.startswith({venv_site!r}), lit_meta.__file__\n"
        f"assert d.__file__.startswith({venv_site!r}) and c.__file__.startswith({venv_site!r})\n"
        "assert importlib.util.find_spec('datamodules') is None, 'a top-level datamodules package was installed'\n"
        "assert importlib.util.find_spec('callbacks') is None, 'a top-level callbacks package was installed'\n"
        "assert OmniglotDataModule.__module__ == 'lit_meta.datamodules.omniglot'\n"
        "print('ok')\n"
    )
    result = subprocess.run([python, "-c", check], cwd=outside, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_no_module_imports_the_top_level_folders_by_name():
    for path in [*REPO.glob("lit_meta/**/*.py"), *REPO.glob("datamodules/**/*.py"), *REPO.glob("callbacks/**/*.py"),
                 *REPO.glob("tests/**/*.py"), *REPO.glob("benchmarks/**/*.py"), REPO / "train.py"]:
        for line in path.read_text().splitlines():
            stripped = line.strip()
            assert not stripped.startswith(("import datamodules", "from datamodules", "import callbacks",
                                            "from callbacks")), f"{path}: {stripped}"
