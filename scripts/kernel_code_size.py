"""Machine-code size of each CUDA kernel, largest first: what a decode step fetches from memory on
each use of a kernel, since the weights evict its code from L2 between layers.

    python scripts/kernel_code_size.py [--source rht_cluster.cu] [--grep e8p_matvec_xs] [--top 30]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cuda_ffi import build  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", nargs="*", default=list(build.SOURCES), help="CUDA sources (default: all)")
    p.add_argument("--arch", default="90", help="compute capability to compile for (default 90)")
    p.add_argument("--grep", default="", help="only kernels whose demangled name contains this")
    p.add_argument("--top", type=int, default=40, help="rows to print (default 40)")
    args = p.parse_args(argv)
    rows = [(size, name) for src in args.source for name, size in build.kernel_code_sizes(src, args.arch).items()]
    names = [n for _, n in rows]
    if shutil.which("c++filt"):
        names = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    shown = sorted(((size, name) for (size, _), name in zip(rows, names) if args.grep in name), reverse=True)
    for size, name in shown[:args.top]:
        print(f"{size / 1024:8.1f} KB  {name}")
    print(f"{len(shown)} kernels, {sum(s for s, _ in shown) / 1024:.0f} KB")


if __name__ == "__main__":
    main()
