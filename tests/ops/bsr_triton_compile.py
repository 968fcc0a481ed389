"""Compile sparseq's Triton BSR kernel for sm_90 without a GPU (run by test_bsr_triton.py).

    python tests/ops/bsr_triton_compile.py

Must run without TRITON_INTERPRET (the interpreter replaces the kernel by a Python function).
Compiles the specializations the JIT would make for a few problems (tensor-core and CUDA-core
blocks, every value dtype) and checks the code a fast BSR needs: bf16 32x32 blocks on wgmma with
cp.async-pipelined loads, and no register spills anywhere (read with the cuobjdump triton ships).
Exits nonzero with a message on the first failure.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparseq.triton import bsr_matmul as bm

POINTERS = ("x_ptr", "row_ptr_ptr", "col_idx_ptr", "values_ptr", "w_scale_ptr", "bias_ptr", "out_ptr", "error_ptr")
INTS = ("M", "N", "K", "NB", "KB", "NNZB", "M_BUCKET", "stride_xm", "stride_om")
# What the JIT specializes at launch for these problems: 16-byte aligned pointers and 16-divisible
# sizes and strides.
DIVISIBLE_BY_16 = POINTERS + ("N", "K", "stride_xm", "stride_om")
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "i8"}

# x dtype, values dtype, block, BLOCK_M, num_warps, num_stages, must use wgmma + cp.async.
# The benchmark's headline problem (bf16 32x32 blocks) under every autotuning config (wgmma needs
# BLOCK_M >= 64), then other dtypes and block shapes under one config each.
CASES = [(torch.bfloat16, torch.bfloat16, (32, 32), block_m, warps, stages, block_m >= 64)
         for block_m, warps, stages in bm.TILES] + [
    (torch.float16, torch.int8, (16, 16), 64, 4, 3, True),
    (torch.float32, torch.float32, (32, 32), 64, 4, 3, False),
    (torch.bfloat16, torch.float16, (24, 40), 32, 4, 3, False),
    (torch.bfloat16, torch.bfloat16, (4, 4), 64, 4, 3, False),
    (torch.float32, torch.int8, (1, 8), 128, 8, 3, False),
    (torch.float16, torch.float32, (3, 5), 16, 2, 4, False),
]


def compile_case(x_dtype, values_dtype, block, block_m, num_warps, num_stages, in_features=4096):
    fn = bm._bsr_linear_kernel
    const = bm.launch_constants(x_dtype, values_dtype, block, in_features, has_bias=True)
    const["BLOCK_M"] = block_m
    const["K_CHUNK"] = bm._k_chunk(const)
    signature = {name: "constexpr" for name in fn.arg_names}
    signature.update({name: "i32" for name in INTS})
    signature.update(x_ptr=f"*{TRITON_TYPES[x_dtype]}", out_ptr=f"*{TRITON_TYPES[x_dtype]}",
                     values_ptr=f"*{TRITON_TYPES[values_dtype]}", row_ptr_ptr="*i32", col_idx_ptr="*i32",
                     error_ptr="*i32", bias_ptr="*fp32")
    if const["HAS_SCALE"]:
        signature["w_scale_ptr"] = "*fp32"
    else:
        const["w_scale_ptr"] = None
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
             for name in DIVISIBLE_BY_16 if signature[name] != "constexpr"}
    return triton.compile(ASTSource(fn, signature, const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def spilled_bytes(cubin: bytes) -> int | None:
    """Local memory (register spills) plus stack bytes per thread, or None without cuobjdump."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return sum(int(v) for v in re.findall(r"(?:LOCAL|STACK):(\d+)", usage))


def main() -> int:
    if bm.INTERPRET:
        print("TRITON_INTERPRET is set: unset it to compile", file=sys.stderr)
        return 2
    for x_dtype, values_dtype, block, block_m, warps, stages, fast_path in CASES:
        name = f"x {x_dtype} values {values_dtype} block {block} BLOCK_M={block_m} warps={warps} stages={stages}"
        try:
            kernel = compile_case(x_dtype, values_dtype, block, block_m, warps, stages)
        except Exception as exc:  # report which specialization broke
            print(f"FAILED to compile {name}: {type(exc).__name__}: {exc}")
            return 1
        ptx = kernel.asm["ptx"]
        uses = {"wgmma": "wgmma.mma_async" in ptx, "cp.async": "cp.async" in ptx}
        spills = spilled_bytes(kernel.asm["cubin"])
        print(f"{name}: shared {kernel.metadata.shared} B, spilled {spills} B, {uses}")
        if fast_path and not all(uses.values()):
            print(f"FAILED: {name} should use wgmma with cp.async-pipelined loads")
            return 1
        if spills:
            print(f"FAILED: {name} spills registers to local memory")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
