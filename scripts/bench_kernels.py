"""The kernel benchmark, as ``jaxquant bench kernels`` runs it (``jaxquant/kernel_bench.py``)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxquant.kernel_bench import main  # noqa: E402

if __name__ == "__main__":
    main()
