#!/usr/bin/env bash
# Installs one sparseq wheel into a fresh venv and runs the test suite against the installed package.
#   tools/test_wheel.sh dist/sparseq-0.1.0+cpu-cp311-cp311-linux_x86_64.whl [pytest args]
# The tests run from a copy of tests/ in a temporary folder, so `import sparseq` can only find the
# wheel's package in the venv (checked before the suite and again inside the pytest process).
# Tests that need the repository tree (examples/, csrc/, setup.py) are left out by path.
#   PYTHON             interpreter the venv is made from (default python3; must match the wheel's tag)
#   TORCH_SPEC         torch to install (default torch==2.14.1, the one the Makefile builds against)
#   WHEEL_TEST_DEPS    optional packages whose tests would otherwise skip (transformers matplotlib)
#   TORCH_CUDA_ARCH_LIST  archs a CUDA wheel must report (default 8.0;9.0, as tools/build_wheel.sh)
# Default pytest args: -m "not slow". A CUDA wheel's kernels run only where torch sees a GPU;
# elsewhere its run covers the import, the CPU kernels and the reference path.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ ! -f "$1" ]; then
  echo "usage: tools/test_wheel.sh WHEEL [pytest args] (no wheel at '${1:-}')" >&2; exit 2
fi
wheel=$(realpath "$1"); shift
if [ $# -eq 0 ]; then set -- -m "not slow"; fi
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
WHEEL_TEST_DEPS=${WHEEL_TEST_DEPS-transformers matplotlib}
cuda_archs=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
version=$(basename "$wheel" | cut -d- -f2)
label=${version#*+}
if [ "$label" = "$version" ]; then
  echo "tools/test_wheel.sh: $(basename "$wheel") has no local label (+cpu, +cuXYZ): build it with tools/build_wheel.sh" >&2
  exit 2
fi
unset PYTHONPATH SPARSEQ_SKIP_EXT

work=$(mktemp -d "${TMPDIR:-/tmp}/sparseq-wheel-test.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "sparseq: testing $(basename "$wheel") in a fresh venv under $work"
start=$SECONDS
"$PYTHON" -m venv "$work/venv"
py=$work/venv/bin/python
# (pip warns about every package missing from each extra local index; those lines say nothing here)
"$py" -m pip install -q "$TORCH_SPEC" "$wheel[test]" $WHEEL_TEST_DEPS 2>&1 \
  | { grep -v "^WARNING: Location 'file:.*' is ignored: it is neither a file nor a directory" || true; }
echo "sparseq: venv ready in $((SECONDS - start))s"

mkdir "$work/tree"
cp -r tests pyproject.toml "$work/tree/"   # pyproject.toml: pytest's markers and warning filters
find "$work/tree" -name __pycache__ -prune -exec rm -rf {} +
cd "$work/tree"
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
export SPARSEQ_WHEEL_SITE=$site SPARSEQ_WHEEL_VERSION=$version
cat > tests/test_installed_wheel.py <<'PY'
"""Written by tools/test_wheel.sh: the suite in this process runs the installed wheel."""
import os

import sparseq


def test_suite_runs_the_installed_wheel():
    assert sparseq.__file__.startswith(os.environ["SPARSEQ_WHEEL_SITE"] + os.sep), sparseq.__file__
    assert sparseq.HAS_EXT, sparseq.EXT_ERROR
    assert sparseq.__version__ == os.environ["SPARSEQ_WHEEL_VERSION"]
PY

"$py" - "$label" <<'PY'
import os
import sys

import sparseq
from sparseq import _C

label = sys.argv[1]
assert "site-packages" in sparseq.__file__ and sparseq.__file__.startswith(os.environ["SPARSEQ_WHEEL_SITE"]), \
    f"sparseq imported from {sparseq.__file__}, not from the wheel"
assert sparseq.HAS_EXT, f"the wheel's extension did not load: {sparseq.EXT_ERROR}"
assert sparseq.__version__ == os.environ["SPARSEQ_WHEEL_VERSION"], sparseq.__version__
assert _C.with_cuda == (label != "cpu"), f"+{label} wheel, but _C.with_cuda is {_C.with_cuda}"
print(f"sparseq {sparseq.__version__} from {sparseq.__file__}, extension loaded, with_cuda={_C.with_cuda}")
PY
info=$("$work/venv/bin/sparseq" info)
echo "$info"
archs_line=$(echo "$info" | grep '^CUDA archs compiled:' || true)
if [ "$label" = cpu ]; then expected=none; else expected=${cuda_archs// /;}; fi   # info joins archs with ";"
if [ "$(echo "$archs_line" | sed 's/^CUDA archs compiled: *//')" != "$expected" ]; then
  echo "sparseq info reports '$archs_line'; expected $expected for a +$label wheel" >&2; exit 1
fi

start=$SECONDS
"$py" -m pytest -q -p no:cacheprovider \
  --ignore=tests/test_examples.py --ignore=tests/test_example_mnist.py \
  --ignore=tests/test_example_minilm.py --ignore=tests/test_build_version.py \
  --deselect tests/ops/test_int8_cuda.py::test_tensor_core_tile_layout_replays_on_cpu \
  --deselect tests/ops/test_sparse_cuda.py::test_sparse24_tile_layout_replays_on_cpu \
  "$@"
echo "sparseq: tests against $(basename "$wheel") passed in $((SECONDS - start))s"
