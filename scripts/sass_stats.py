"""Instruction counts of the CUDA kernels' machine code (SASS), without a GPU.

    python3 scripts/sass_stats.py e8p_matvec_xs_kernel [--lib PATH] [--show 40]

At batch 1 our decode-matvecs are issue-bound (Nsight Compute, session 7), so the instructions in a
kernel's hot loop per weight predict its speed. This disassembles the built library (or --lib),
and for every kernel whose mangled name contains the pattern prints its size, its longest loop
(the widest backward branch) and that loop's opcode histogram. Needs cuobjdump and nvdisasm: the
CUDA toolkit's, or those in the `nvidia-cuda-cuobjdump` and `nvidia-cuda-nvdisasm` wheels (pip
download --no-deps both, unzip, add nvidia/cu13/bin to PATH). The longest loop of a kernel with
nested loops is the outer one: read its inner loops in the listing (--show).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_OPCODE = re.compile(r"(?:@!?U?P\w+\s+)?([A-Z0-9_]+(?:\.[A-Z0-9_]+)*)")
_BRANCH = re.compile(r"\bBRA(?:\.\w+)*\s+(?:`?\(?)0x([0-9a-f]+)")


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """{mangled name: [(address, instruction text), ...]} from ``cuobjdump -sass`` output."""
    out = {}
    for part in re.split(r"\n\s*Function : ", sass)[1:]:
        name, _, body = part.partition("\n")
        out[name.strip()] = [(int(m.group(1), 16), m.group(2)) for m in _LINE.finditer(body)]
    return out


def longest_loop(code: list[tuple[int, str]]) -> list[str]:
    """The instructions between the target and the source of the widest backward branch."""
    best = None
    for addr, text in code:
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) < addr:
            span = (int(m.group(1), 16), addr)
            if best is None or span[1] - span[0] > best[1] - best[0]:
                best = span
    return [] if best is None else [text for addr, text in code if best[0] <= addr <= best[1]]


def opcodes(instructions: list[str]) -> collections.Counter:
    return collections.Counter(_OPCODE.match(text).group(1) for text in instructions)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pattern", help="part of the kernels' (mangled) names, e.g. e8p_matvec_xs_kernel")
    p.add_argument("--lib", help="a built library or cubin (default: build or reuse jaxquant's)")
    p.add_argument("--show", type=int, default=0, help="also print the loop's first N instructions")
    args = p.parse_args(argv)
    tool = shutil.which("cuobjdump")
    if tool is None:
        sys.exit("sass_stats: cuobjdump not found on PATH (see this script's docstring)")
    lib = args.lib
    if lib is None:
        from cuda_ffi import build

        lib = str(build.compile_library())
    sass = subprocess.run([tool, "-sass", lib], capture_output=True, text=True, check=True).stdout
    found = {n: c for n, c in functions(sass).items() if args.pattern in n}
    if not found:
        sys.exit(f"sass_stats: no kernel matching {args.pattern!r} in {lib}")
    for name, code in found.items():
        loop = longest_loop(code)
        print(f"{name}\n  {len(code)} instructions; longest loop {len(loop)}")
        print("  " + ", ".join(f"{op} {n}" for op, n in opcodes(loop).most_common(16)))
        for text in loop[:args.show]:
            print("    " + text)


if __name__ == "__main__":
    main()
