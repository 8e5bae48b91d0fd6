#!/usr/bin/env bash
# The GPU benchmarks still owed by open issues, in one device call each (≤ 10 minutes).
# Usage on the device machine, from the repo root:  bash scripts/gpu_suite.sh PART OUTDIR
#   kernels   issue 10: decode-matvec and Hadamard vs copy bandwidth, plus the gpu tests
#   qtip      issue 6: Viterbi speed (target HYB <= 5 ms, 1MAD <= 8 ms per 65,536 weights at k=2)
#   decode    issue 11: decode tokens/s vs the bandwidth bound, Llama-2-7B shape
#   hessian   issue 7/8: Hessian collection scaling (run on nvidia-h200-x2 / -x4)
# SmolLM2 perplexities (issues 5, 6) need the GGUF, which exceeds one carry: send it in two carries
# to one warm machine (see results/README.md) and run scripts/bench_perplexity.py with recipes
# quip#:bits=3 quip#:bits=4 qtip:bits=2 qtip:bits=3 qtip:bits=4.
set -uo pipefail
part=${1:?part}; out=${2:?outdir}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
case $part in
  kernels)  # build (nvcc on first use), the gpu tests, then every kernel at the Llama shapes, batch 1
    timeout 150 python3 -c "import cuda_ffi; cuda_ffi.load(); print('cuda_ffi built')"
    JAX_PLATFORMS=cuda timeout 200 python3 -m pytest -q -m gpu tests/test_kernels.py
    timeout 300 python3 scripts/bench_kernels.py --json "$out/bench_kernels.json" --bits 2 3 4 8 \
      --vq e8p rvq4 qtip-hyb-k2 qtip-1mad-k2 qtip-3inst-k2 qtip-hyb-k3 qtip-hyb-k4 --hadamard-n 4096 8192 16384 ;;
  qtip)
    timeout 540 python3 scripts/bench_viterbi.py --json "$out/viterbi.json" ;;
  decode)
    for m in "rtn --bits 4 --group-size 128" "rtn --bits 2 --group-size 128" "quip# --bits 2" "qtip --bits 2"; do
      timeout 140 python3 -m jaxquant.cli bench decode --shape llama2-7b --method $m --json "$out/decode_${m%% *}.json"
    done ;;
  hessian)
    timeout 540 python3 scripts/bench_hessian.py --shape llama2-7b --layers 4 --ctx 4096 --devices 1 2 \
      --json "$out/hessian.json" ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
