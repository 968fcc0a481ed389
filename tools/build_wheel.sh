#!/usr/bin/env bash
# Builds one sparseq wheel into dist/ and checks what it holds.
#   tools/build_wheel.sh cpu    SPARSEQ_BUILD_CUDA=0, version X.Y.Z+cpu
#   tools/build_wheel.sh cuda   SPARSEQ_BUILD_CUDA=1, version X.Y.Z+cuXYZ from the building torch's
#                               CUDA (torch.version.cuda 13.0 -> +cu130), TORCH_CUDA_ARCH_LIST
#                               (default 8.0;9.0)
# PYTHON (default .venv/bin/python) is the interpreter, and so the torch, the wheel is built against.
set -euo pipefail
cd "$(dirname "$0")/.."
variant=${1:-}
PYTHON=${PYTHON:-.venv/bin/python}
case $variant in
  cpu) build_cuda=0 ;;
  cuda) build_cuda=1 ;;
  *) echo "usage: tools/build_wheel.sh cpu|cuda (got '${variant}')" >&2; exit 2 ;;
esac
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}

base=build/wheel-$variant
# Compiled objects: reuse make build's (build_ext --inplace) when they were compiled for this
# variant, so the wheel only relinks them; else keep this variant's own. Ninja recompiles every
# object whose command line changed, so a wrong guess costs time, never a mixed build.
inplace_temp=$("$PYTHON" -c 'from setuptools.dist import Distribution
build = Distribution().get_command_obj("build"); build.finalize_options(); print(build.build_temp)')
temp=$base/temp
if [ -f "$inplace_temp/build.ninja" ]; then
  if grep -q SPARSEQ_WITH_CUDA "$inplace_temp/build.ninja"; then inplace_variant=cuda; else inplace_variant=cpu; fi
  if [ "$inplace_variant" = "$variant" ]; then temp=$inplace_temp; fi
fi
# Everything but the objects starts empty: a stale module, or the other variant's _C.so, must not
# reach the wheel (setuptools skips a link whose output looks newer than the sources).
rm -rf "$base/lib" "$base/bdist" "$base/dist" "$base/egg-info"
mkdir -p "$base/egg-info" dist

echo "sparseq: building the $variant wheel (objects in $temp, MAX_JOBS=${MAX_JOBS:-all cores})"
start=$SECONDS
# build, then bdist_wheel --skip-build: without it bdist_wheel compiles once more, and torch's
# BuildExtension, which appends its defines on every run, would recompile every object.
SPARSEQ_BUILD_CUDA=$build_cuda SPARSEQ_LOCAL_VERSION=auto "$PYTHON" setup.py -q \
  egg_info --egg-base "$base/egg-info" \
  build --build-base "$base" --build-lib "$base/lib" --build-temp "$temp" \
  bdist_wheel --skip-build --bdist-dir "$base/bdist" --dist-dir "$base/dist"
seconds=$((SECONDS - start))

wheel=$(echo "$base"/dist/*.whl)
"$PYTHON" - "$wheel" "$variant" <<'PY'
"""The wheel holds the package (every file of it in the source tree), one _C*.so and its metadata,
nothing else; its version carries the variant's label."""
import os
import subprocess
import sys
import zipfile

wheel, variant = sys.argv[1:]
names = zipfile.ZipFile(wheel).namelist()
dist_info = [n for n in names if ".dist-info/" in n]
package = [n for n in names if n.startswith("sparseq/")]
stray = sorted(set(names) - set(dist_info) - set(package))
problems = [f"files outside sparseq/ and the metadata: {stray}"] if stray else []
libs = [n for n in package if n.startswith("sparseq/_C") and n.endswith(".so")]
if len(libs) != 1:
    problems.append(f"expected one sparseq/_C*.so, found {libs}")
elif (b"libcudart.so" in zipfile.ZipFile(wheel).read(libs[0])) != (variant == "cuda"):
    problems.append(f"{libs[0]} {'lacks' if variant == 'cuda' else 'links'} the CUDA runtime")
try:  # every tracked file of the package: modules of every subpackage, and any data files
    tracked = subprocess.run(["git", "ls-files", "sparseq"], capture_output=True, text=True,
                             check=True).stdout.split()
except (OSError, subprocess.CalledProcessError):  # not a git checkout: the package's .py files
    tracked = [os.path.join(root, f) for root, _, files in os.walk("sparseq") for f in files
               if f.endswith(".py")]
missing = sorted(set(tracked) - set(names))
if missing:
    problems.append(f"files missing from the wheel (pyproject's packages or package data?): {missing}")
version = os.path.basename(wheel).split("-")[1]
label = version.partition("+")[2]
if not (label == "cpu" if variant == "cpu" else label.startswith("cu")):
    problems.append(f"version {version} does not carry the {variant} label")
if problems:
    sys.exit(f"{wheel}: " + "; ".join(problems))
PY
mv -f "$wheel" dist/
echo "dist/$(basename "$wheel")" > "$base/wheel-path"   # for make wheel-test
echo "sparseq: built dist/$(basename "$wheel") ($(du -h "dist/$(basename "$wheel")" | cut -f1)) in ${seconds}s"
