"""Hessians H = E[x xᵀ] of the inputs of every linear group, collected data-parallel over devices and hosts.

Numerics: each device step forms the partial product ``aᵀa`` of its tokens on the tensor cores
(bf16/fp16 inputs: exact products, fp32 accumulation; fp32 inputs: full-precision fp32; fp64 where
x64 is on and the backend is the CPU), at most ``chunk_tokens`` tokens per partial, and adds the
partial to an fp32 (high, low) pair with Knuth's TwoSum, so that millions of tokens accumulate
without fp32 drift (the failure of a plain running sum when activations have a large mean).

Parallelism: a mesh ``('data', 'rows')`` over every device of every process (``jax.shard_map``).
Calibration windows are split over all devices; each device accumulates its own moments, and one
reduction per group at the end combines them: an ``all_to_all`` hands every device one row slice of
every device's (high, low) pair, summed in device order with TwoSum, then ``all_gather``ed (the
traffic of a psum, without its rounding). With the same windows per device and step, n devices
give bit-identical Hessians to one. With ``rows > 1`` the Hessian's rows are split over the
``rows`` axis (memory ``d²/rows`` per device): the devices of a row group exchange their inputs
(``all_gather``) and each forms its slice of rows. Several processes join through
``jax.distributed.initialize`` beforehand (``jaxquant hessians --coordinator``).

Modes: online (``quantize_model`` asks for one group of the block as quantized so far,
``collect_block``) and offline (``collect_offline``: the full-precision model, all four groups in one
forward per block, stored per block as .npy + JSON, atomic and resumable; ``jaxquant hessians``).

Modules: ``accumulate`` (the moments, their compensated sums and diagnostics, the mesh and its
sharded steps), ``collect`` (calibration batches, the inputs and Hessians of one block's groups),
``offline`` (stored per-block Hessians and the ``jaxquant hessians`` command).
"""
from jaxquant.hessian.accumulate import (DEFAULT_CHUNK_TOKENS, FORMAT_VERSION, GROUP_LAYERS, GROUP_NAMES,
                                         HessianStats, InputsFn, Moments, accumulator_dtype,
                                         check_enough_tokens, diagnose, make_mesh)
from jaxquant.hessian.collect import (Batches, batches_from_array, batches_from_tokens, block_inputs,
                                      block_inputs_fn, choose_attention, collect_block, forward_block,
                                      fused_attention_available, group_widths, moments)
from jaxquant.hessian.offline import add_cli, cmd_hessians, collect_offline, finished_blocks, stored_hessians
