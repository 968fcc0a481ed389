"""Build script for sparseq's C++/CUDA extension (sparseq._C).

SPARSEQ_BUILD_CUDA=auto|0|1  auto: build the CUDA kernels when nvcc is found and torch has CUDA.
SPARSEQ_BUILD_EXT=0          skip the extension entirely (pure-PyTorch reference path).
SPARSEQ_LOCAL_VERSION=LABEL  append a PEP 440 local label to the version (0.1.0+LABEL); "auto" names
                             the extension build: "cpu", or "cu130" for torch's CUDA 13.0. Unset:
                             the plain version from sparseq/__init__.py, the one source of truth.
TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured as torch.utils.cpp_extension does.
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION_FILE = os.path.join(HERE, "sparseq", "__init__.py")
_VERSION_LINE = re.compile(r'^__version__ = "([^"]+)"$', re.MULTILINE)
_LOCAL_LABEL = re.compile(r"[a-z0-9]+(\.[a-z0-9]+)*")


def _cuda_include_dirs():
    # cuBLASLt/cuSPARSE(Lt) headers ship in the nvidia-* wheels, not in the CUDA toolkit here.
    dirs = []
    for base in sys.path:
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _want_cuda(torch_mod):
    mode = os.environ.get("SPARSEQ_BUILD_CUDA", "auto").lower()
    if mode in ("0", "false", "no"):
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    available = torch_mod.version.cuda is not None and (
        CUDA_HOME is not None or shutil.which("nvcc") is not None)
    if mode in ("1", "true", "yes") and not available:
        raise RuntimeError("SPARSEQ_BUILD_CUDA=1 but nvcc or a CUDA build of torch is missing")
    return available


def _base_version():
    with open(VERSION_FILE) as f:
        found = _VERSION_LINE.findall(f.read())
    if len(found) != 1:
        raise RuntimeError(f"{VERSION_FILE} must hold exactly one line __version__ = \"X.Y.Z\"; "
                           f"found {len(found)}")
    return found[0]


def _local_label(ext_build):
    """The local version label asked for by SPARSEQ_LOCAL_VERSION; ext_build is "cpu", "cuXYZ", or
    None when no extension is compiled."""
    label = os.environ.get("SPARSEQ_LOCAL_VERSION", "").strip().lower()
    if label == "auto":
        if ext_build is None:
            raise RuntimeError("SPARSEQ_LOCAL_VERSION=auto labels a build by its compiled kernels, but "
                               "the extension is not being built (see the messages above)")
        return ext_build
    if label and not _LOCAL_LABEL.fullmatch(label):
        raise RuntimeError(f"SPARSEQ_LOCAL_VERSION={label!r} is not a PEP 440 local version label "
                           "(letters and digits, dot-separated, e.g. cpu or cu130)")
    return label


class _BuildPyWithVersion(build_py):
    """Copies the package, then rewrites the built sparseq/__init__.py from the source with the full
    version, so that a wheel's sparseq.__version__ matches its metadata. Rewritten on every build
    because copy_file would keep an older build's label (the copy is newer than the source)."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        target = os.path.join(self.build_lib, os.path.relpath(VERSION_FILE, HERE))
        with open(VERSION_FILE) as f:
            text = f.read()
        with open(target, "w") as f:
            f.write(_VERSION_LINE.sub(f'__version__ = "{VERSION}"', text))


def _extensions():
    """(ext_modules, cmdclass, ext_build): ext_build is "cpu", "cuXYZ" or None (nothing compiled)."""
    if os.environ.get("SPARSEQ_BUILD_EXT", "1") == "0":
        return [], {}, None
    compiler = os.environ.get("CXX", "c++").split()[0]
    if shutil.which(compiler) is None:
        print(f"sparseq: no C++ compiler ({compiler!r} not found); building without the extension: "
              "every op will run its pure-PyTorch reference")
        return [], {}, None
    # torch derives CUDA_HOME from `which nvcc`; where nvcc is a wrapper script outside the
    # toolkit (/usr/local/bin/nvcc here) that guess misses libcudart, so prefer the toolkit.
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isfile(
            "/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("sparseq: torch is not importable at build time; building without the extension")
        return [], {}, None

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function"]
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    define_macros = []
    with_cuda = _want_cuda(torch)
    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        define_macros += [("SPARSEQ_WITH_CUDA", None),
                          ("SPARSEQ_CUDA_ARCHS", '"%s"' % arch_list.replace(" ", ";"))]
        ext = CUDAExtension(
            "sparseq._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=include_dirs + _cuda_include_dirs(),
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("sparseq._C", sources, include_dirs=include_dirs,
                           define_macros=define_macros, extra_compile_args=cxx,
                           extra_link_args=["-fopenmp"])
    ext_build = "cu" + torch.version.cuda.replace(".", "") if with_cuda else "cpu"
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, ext_build


ext_modules, cmdclass, ext_build = _extensions()
VERSION = "+".join(part for part in (_base_version(), _local_label(ext_build)) if part)
setup(version=VERSION, ext_modules=ext_modules, cmdclass={**cmdclass, "build_py": _BuildPyWithVersion})
