"""Build script for sparseq's C++/CUDA extension (sparseq._C).

SPARSEQ_BUILD_CUDA=auto|0|1  auto: build the CUDA kernels when nvcc is found and torch has CUDA.
SPARSEQ_BUILD_EXT=0          skip the extension entirely (pure-PyTorch reference path).
TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured as torch.utils.cpp_extension does.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


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


def _extensions():
    if os.environ.get("SPARSEQ_BUILD_EXT", "1") == "0":
        return [], {}
    compiler = os.environ.get("CXX", "c++").split()[0]
    if shutil.which(compiler) is None:
        print(f"sparseq: no C++ compiler ({compiler!r} not found); building without the extension: "
              "every op will run its pure-PyTorch reference")
        return [], {}
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
        return [], {}

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function"]
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    define_macros = []
    if _want_cuda(torch):
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
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
