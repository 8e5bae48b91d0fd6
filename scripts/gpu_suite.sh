#!/usr/bin/env bash
# The GPU benchmarks still owed by open issues, in one device call each (≤ 10 minutes).
# Usage on the device machine, from the repo root:  bash scripts/gpu_suite.sh PART OUTDIR
#   kernels-tests  issue 10: scalar and Hadamard gpu kernel tests
#   kernels   issue 10: scalar decode-matvec and Hadamard vs copy bandwidth
#   hadamard-k issue 10: the fused K * 2^p Hadamard kernel (gpu tests, then its rows beside kernel + einsum,
#             64 MB per call and 1 to 128 rows: rht_fast takes it from 32)
#   kernels-vq-tests  issue 10: E8P / RVQ4 / QTIP gpu tests
#   kernels-vq  issue 10: E8P / RVQ4 / QTIP decode-matvec and their full linear (RHT included)
#   e8p-sweep issue 10: E8P / RVQ4 launch configurations and the x-stationary variant (with their gpu tests)
#   e8p-phases issue 10: per-block phase stamps and SMs of the batch-1 E8P kernel (a -DJAXQUANT_E8P_PHASES build;
#             carried as .devcarry/phases/$PHASES_LIB.so, default phases.so, else built here)
#   e8p-libs  issue 10: batch-1 E8P / RVQ4 rows (kernel and one-call linear, 7B and 70B shapes, device clock)
#             with each library carried in .devcarry/lib in turn (a default build beside experiment builds such
#             as -DJAXQUANT_E8P_POOL=N; ~1-1.5 minutes a library); to test one, carry it as
#             .devcarry/lib/libjaxquant_cuda_ffi.so and run kernels-vq-tests
#   overhead  issues 10, 11: per-custom-call cost with and without XLA command buffers
#   ncu       issues 10, 11: Nsight Compute sections of every batch-1 kernel at a 7B and a 70B shape (why they
#             are slow: latency, occupancy, memory or issue)
#   qtip      issue 6: Viterbi speed (target HYB <= 5 ms, 1MAD <= 8 ms per 65,536 weights at k=2)
#   qtip-1mad issue 6: the 1MAD pair step with 1024-4096 sequences per chunk and unroll 2 / 4
#   decode    issue 11: decode tokens/s vs the bandwidth bound, Llama-2-7B shape
#   hessian   issue 8: Hessian collection scaling (nvidia-h200-x4: --devices 1 2 4)
#   smollm2   issue 11: needs /tmp/m/smollm2.gguf (below); QuIP# 2-bit quantization and generation
#   smollm2-ft  issue 9: needs /tmp/m/smollm2.gguf; QTIP block + end-to-end fine-tuning row
# The SmolLM2 GGUF (98 MB) exceeds one carry: send it in two carries to one warm machine. Here:
# split -b 44M the GGUF into .devcarry/a/part_aa and .devcarry/b/part_ab, part_ac (both folders in
# .git/info/exclude); put wiki.valid.tokens and the test text tokenized with the GGUF tokenizer
# (.npy) in .devcarry/b. Call 1 (carry .devcarry/a): mkdir -p /tmp/m && cp .devcarry/a/part_aa /tmp/m/.
# Call 2 at once (carry .devcarry/b and .whl with gguf, hqq): cat the parts into /tmp/m/smollm2.gguf.
set -uo pipefail
part=${1:?part}; out=${2:?outdir}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# A library built here for sm_90 (python3 -c "from cuda_ffi import build; print(build.compile_library())",
# copied to .devcarry/lib/libjaxquant_cuda_ffi.so and carried) saves the device's nvcc minutes.
build_cuda() {
  if [ -f .devcarry/lib/libjaxquant_cuda_ffi.so ]; then
    export JAXQUANT_CUDA_LIBRARY=$PWD/.devcarry/lib/libjaxquant_cuda_ffi.so
    timeout 60 python3 -c "import cuda_ffi; cuda_ffi.load(); print('cuda_ffi prebuilt')" && return
    unset JAXQUANT_CUDA_LIBRARY
  fi
  timeout 300 python3 -c "import cuda_ffi; cuda_ffi.load(); print('cuda_ffi built')"; }
case $part in
  kernels-tests)  # issue 10, part 1: scalar / Hadamard gpu tests (~21 of them took the 220 s they once had)
    build_cuda
    JAX_PLATFORMS=cuda timeout 540 python3 -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider \
      -k "not e8p and not qtip" --durations 10 > "$out/kernel_tests.log" 2>&1; tail -15 "$out/kernel_tests.log" ;;
  kernels)  # issue 10, part 2: scalar matvec and Hadamard rows (batch 1)
    build_cuda
    timeout 300 python3 scripts/bench_kernels.py --json "$out/bench_kernels.json" --bits 2 3 4 8 \
      --hadamard-n 4096 8192 16384 32768 28672 ;;
  hadamard-k)  # issue 10: n = 28672 / 14336 / 5120 / 3072 in one kernel (cuda-k) against 2^p kernel + einsum
    build_cuda
    JAX_PLATFORMS=cuda timeout 300 python3 -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider \
      -k "hadamard_k or rht_fast" --durations 5 > "$out/kernel_tests_hadamard_k.log" 2>&1; tail -8 "$out/kernel_tests_hadamard_k.log"
    timeout 200 python3 scripts/bench_kernels.py --backends cuda --no-matvec --json "$out/bench_hadamard_k.json" \
      --hadamard-n 28672 14336 5120 3072 8192 --hadamard-rows 1 8 16 32 64 128 ;;
  kernels-vq-tests)  # issue 10, part 2: E8P / RVQ4 / QTIP gpu tests (their matrix needs most of a call)
    build_cuda
    JAX_PLATFORMS=cuda timeout 450 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_pallas_vq.py -p no:cacheprovider \
      -k "e8p or qtip or vq" --durations 10 > "$out/kernel_tests_vq.log" 2>&1; tail -20 "$out/kernel_tests_vq.log" ;;
  kernels-vq)  # issue 10, part 3: E8P / RVQ4 / QTIP kernels alone, then the full linear (RHT included)
    build_cuda
    timeout 240 python3 scripts/bench_kernels.py --backends cuda --no-matvec --hadamard-n --vq-cases kernel \
      --json "$out/bench_kernels_vq.json" --vq e8p rvq4 qtip-hyb-k2 qtip-1mad-k2 qtip-3inst-k2 qtip-hyb-k4 gptvq-d2-k2
    timeout 180 python3 scripts/bench_kernels.py --backends cuda --no-matvec --hadamard-n --vq-cases linear-cuda linear-pallas \
      --json "$out/bench_kernels_linear.json" --models llama2-7b llama2-70b --vq e8p qtip-hyb-k2 ;;
  e8p-sweep)  # issue 10: E8P / RVQ4 launch configurations (rows per warp, units per step) at every shape
    build_cuda
    JAX_PLATFORMS=cuda timeout 200 python3 -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider \
      -k "e8p_matvec_gpu or (qtip_matvec_gpu and 2-hyb)" > "$out/kernel_tests_e8p.log" 2>&1; tail -3 "$out/kernel_tests_e8p.log"
    timeout 200 python3 scripts/bench_kernels.py --backends cuda --no-matvec --hadamard-n --vq-cases kernel \
      --json "$out/bench_e8p_sweep.json" --vq e8p rvq4 qtip-hyb-k2 --vq-configs '[{}, {"rows_per_warp": 1,
      "units_per_step": 1}, {"rows_per_warp": 1, "units_per_step": 2}, {"rows_per_warp": 2, "units_per_step": 1},
      {"rows_per_warp": 2, "units_per_step": 2}, {"rows_per_warp": 4, "units_per_step": 1},
      {"rows_per_warp": 4, "units_per_step": 2}, {"variant": 1, "rows_per_warp": 2}, {"variant": 1,
      "rows_per_warp": 4}, {"variant": 1, "rows_per_warp": 2, "warps": 4}, {"variant": 1, "prefetch": 2},
      {"variant": 1, "rows_per_warp": 4, "prefetch": 2}]' | grep -v "^llama.*warn"
    timeout 90 python3 scripts/bench_kernels.py --backends cuda --no-matvec --hadamard-n --vq-cases linear-cuda \
      --json "$out/bench_e8p_linear.json" --models llama2-70b --vq e8p
    # GPTVQ (no transform: kernel = whole product): Pallas ("kernel" rows) against CUDA ("linear-cuda")
    timeout 150 python3 scripts/bench_kernels.py --backends cuda --no-matvec --hadamard-n --vq-cases kernel linear-cuda \
      --json "$out/bench_gptvq.json" --vq gptvq-d2-k2 ;;
  e8p-phases)
    lib=$PWD/.devcarry/phases/${PHASES_LIB:-phases}.so  # PHASES_LIB=phases_pool3: a build with both flags
    [ -f "$lib" ] || { lib=/tmp/phases.so; timeout 400 python3 -c "from cuda_ffi import build; print(' '.join([build.nvcc_path(),
      *build.nvcc_flags(), '-DJAXQUANT_E8P_PHASES', *map(str, (build.SOURCE_DIR / s for s in build.SOURCES)), '-o', '$lib']))" | sh; }
    JAXQUANT_CUDA_LIBRARY=$lib timeout 150 python3 scripts/e8p_phases.py --save "$out" \
      --shapes 4096x4096 11008x4096 8192x8192 28672x8192 8192x28672 2>&1 | tee "$out/e8p_phases.txt" ;;
  e8p-libs)
    for lib in .devcarry/lib/*.so; do
      name=$(basename "$lib" .so); echo "=== $name"
      JAXQUANT_CUDA_LIBRARY=$PWD/$lib timeout 150 python3 scripts/bench_kernels.py --backends cuda --no-matvec \
        --hadamard-n --batch 1 --vq e8p rvq4 --vq-cases kernel linear-cuda --models llama2-7b llama2-70b \
        --json "$out/bench_b1_$name.json" 2>&1 | grep -v "warn"
    done ;;
  overhead)  # issues 10, 11: is the ~15 us per custom call XLA's command-buffer tracing? Default, custom calls
    # left out of command buffers, no command buffers
    build_cuda
    for flags in "" "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT" "--xla_gpu_enable_command_buffer="; do
      echo "=== XLA_FLAGS='$flags'"
      XLA_FLAGS=$flags timeout 100 python3 scripts/bench_kernels.py --backends cuda --bits 2 4 --copy-mib 512 \
        --shapes 4096x4096 8192x8192 --hadamard-n 8192 --vq e8p --vq-cases kernel linear-cuda 2>&1 | grep -E "us |copy:"
      XLA_FLAGS=$flags timeout 90 python3 -m jaxquant.cli bench decode --shape llama2-7b --layers 8 --method quip# \
        --bits 2 --batch 1 --steps 32 2>&1 | grep "batch"
    done 2>&1 | tee "$out/overhead.log" ;;
  ncu)  # ~4 minutes; the reports are text (one per shape)
    build_cuda
    for shape in 4096x4096 28672x8192; do
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 250 ncu --section SpeedOfLight --section LaunchStats \
        --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis -k regex:"e8p|qtip|scalar|hadamard" \
        python3 scripts/ncu_kernels.py --shape $shape > "$out/ncu_$shape.txt" 2>&1
      grep -E "^  [a-z_:<>(),0-9 ]+\(|Duration|Memory Throughput|Achieved Occupancy|Registers Per|Grid Size" \
        "$out/ncu_$shape.txt" | head -80
    done ;;
  qtip)
    timeout 540 python3 scripts/bench_viterbi.py --json "$out/viterbi.json" ;;
  qtip-1mad)  # issue 6's last target (1MAD k=2 <= 8 ms per 65,536 weights; 8.86 with pair, unroll 2, one chunk)
    timeout 280 python3 scripts/bench_viterbi.py --codes 1mad --bits 2 --impls pair --budgets-gib 1,2,4 --unroll 2 \
      --max-seconds 200 --json "$out/viterbi_1mad_u2.json" 2>&1 | grep -v Warn | tail -5
    timeout 280 python3 scripts/bench_viterbi.py --codes 1mad --bits 2 --impls pair --budgets-gib 2,16 --unroll 4 \
      --max-seconds 200 --json "$out/viterbi_1mad_u4.json" 2>&1 | grep -v Warn | tail -4 ;;
  decode)  # dense rows come with each; file names avoid '#', which $OUT does not return
    for a in "llama2-7b quip# 2" "llama2-7b quip# 2 --fuse" "llama2-7b qtip 2 --fuse" "llama2-7b rtn 4 --group-size 128" \
             "smollm2-135m quip# 2 --fuse"; do
      set -- $a; name=$(echo "decode_$*" | tr -c 'A-Za-z0-9_.\n-' '_')
      timeout 140 python3 -m jaxquant.cli bench decode --shape $1 --method $2 --bits $3 "${@:4}" --json "$out/$name.json"
    done ;;
  hessian)
    timeout 540 python3 scripts/bench_hessian.py --shape llama2-7b --layers 4 --ctx 4096 --devices 1 2 4 \
      --json "$out/hessian.json" ;;
  smollm2)  # loading, quantizing and saving SmolLM2 take ~3 minutes on an H100: keep the timeouts generous
    gguf=/tmp/m/smollm2.gguf b=.devcarry/b
    (timeout 300 python3 -m jaxquant.cli quantize --model $gguf --method quip# --bits 2 --calib-file $b/wiki.valid.tokens \
       --calib-samples 32 --calib-ctx 512 --out /tmp/m/q2 \
     && timeout 90 python3 -m jaxquant.cli generate --model /tmp/m/q2 --chat --prompt "What is the capital of France?" \
       --max-new-tokens 40 \
     && timeout 90 python3 -m jaxquant.cli generate --model /tmp/m/q2 --prompt "The history of Paris" \
       --max-new-tokens 200) > "$out/generate.log" 2>&1; tail -c 1200 "$out/generate.log" ;;
  smollm2-ft)  # issue 9: the QTIP row still missing (block, then end-to-end: ~250 s + ~240 s on an H100)
    gguf=/tmp/m/smollm2.gguf b=.devcarry/b
    timeout 580 python3 scripts/bench_finetune.py --model $gguf --methods qtip --stages block+e2e \
      --tokens-file $b/wikitext2_test_smollm2.npy --calib-file $b/wiki.valid.tokens --eval-windows 8 --ctx 512 \
      --devset 32 --devset-ctx 256 --ft-epochs 2 --json "$out/finetune.json" > "$out/finetune.log" 2>&1 ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
