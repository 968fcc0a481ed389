"""setup.py's version: sparseq/__init__.py's __version__ plus SPARSEQ_LOCAL_VERSION's label, which the
wheels carry (+cpu, +cu130). Needs the source tree (tools/test_wheel.sh leaves this file out)."""
import os
import shutil
import subprocess
import sys

import pytest

import sparseq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_py(*args, cwd=ROOT, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("SPARSEQ_")}
    return subprocess.run([sys.executable, os.path.join(ROOT, "setup.py"), *args], cwd=cwd,
                          env={**base, "SPARSEQ_BUILD_EXT": "0", **env},
                          capture_output=True, text=True, timeout=300)


def _version(**env):
    result = _setup_py("--version", **env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_plain_build_keeps_the_package_version():
    assert _version() == sparseq.__version__
    assert "+" not in sparseq.__version__


@pytest.mark.parametrize("label", ["cpu", "cu130", "CU126", "cu130.sm90"])
def test_local_label_is_appended(label):
    assert _version(SPARSEQ_LOCAL_VERSION=label) == f"{sparseq.__version__}+{label.lower()}"


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++").split()[0]) is None,
                    reason="setup.py leaves the extension out without a C++ compiler")
def test_auto_label_names_the_extension_build():
    assert _version(SPARSEQ_LOCAL_VERSION="auto", SPARSEQ_BUILD_EXT="1",
                    SPARSEQ_BUILD_CUDA="0") == f"{sparseq.__version__}+cpu"


@pytest.mark.parametrize("label", ["cu 130", "+cpu", "cpu-avx2", "cpu.", "ä"])
def test_bad_label_is_refused(label):
    result = _setup_py("--version", SPARSEQ_LOCAL_VERSION=label)
    assert result.returncode != 0
    assert "is not a PEP 440 local version label" in result.stderr


def test_auto_label_without_an_extension_is_refused():
    result = _setup_py("--version", SPARSEQ_LOCAL_VERSION="auto")
    assert result.returncode != 0
    assert "the extension is not being built" in result.stderr


def test_built_package_reports_the_labelled_version(tmp_path):
    """The wheel's sparseq.__version__ carries the label; a later unlabelled build into the same
    folder does not keep it (the stamped copy is newer than the source, so a plain copy would)."""
    def build(**env):
        result = _setup_py("egg_info", "--egg-base", str(tmp_path), "build_py", "--build-lib",
                           str(tmp_path / "lib"), **env)
        assert result.returncode == 0, result.stderr
        return (tmp_path / "lib" / "sparseq" / "__init__.py").read_text()

    source = open(os.path.join(ROOT, "sparseq", "__init__.py")).read()
    plain_line = f'__version__ = "{sparseq.__version__}"'
    labelled = build(SPARSEQ_LOCAL_VERSION="cu130")
    assert labelled == source.replace(plain_line, f'__version__ = "{sparseq.__version__}+cu130"')
    assert build() == source
