"""TEST-ONLY stand-in for SGLang's ``sgl_kernel`` on a CPU without a CPU build of it.

PyPI has no CPU ``sgl_kernel`` (SGLang builds it from its GitHub tree; the ``sglang-kernel``
wheel is CUDA-only). With ``SGLANG_USE_CPU_ENGINE=1`` SGLang 0.5.23 imports the names below at
module load; with ``attention_backend="torch_native"`` on a CPU without AMX none of them is
called, so each one raises if it ever is. It registers no ``torch.ops.sgl_kernel`` ops, so
``sglang.srt.utils.cpu_has_amx_support()`` stays False and SGLang keeps its torch paths.
Installed only into the SGLang test environment (.venv-sglang, see the Makefile), never into
megacredit.
"""

STAND_IN = True


def _raises(name: str):
    def call(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} was called, but this sgl_kernel is megacredit's test-only stand-in "
            f"(tests/sglang_cpu/site/sgl_kernel): the CPU kernel does not exist here; the SGLang "
            f"engine took a path the CPU tests do not expect (check attention_backend=torch_native)")

    call.__name__ = name
    return call


_NAMES = (  # every `from sgl_kernel import` under an `if _is_cpu` at module level of SGLang 0.5.23
    "assign_draft_cache_locs_contiguous_cpu",  # sglang/kernels/ops/speculative/cache_locs.py
    "assign_extend_cache_locs_cpu",  # same
    "assign_req_to_token_pool_cpu",  # sglang/srt/mem_cache/allocation.py
    "build_tree_kernel_efficient_cpu",  # sglang/kernels/ops/speculative/spec_tree.py
    "copy_all_layer_kv_cache_cpu",  # sglang/kernels/ops/kvcache/cache_move.py
    "fill_accept_out_cache_loc_cpu",  # sglang/kernels/ops/speculative/eagle.py
    "fill_bonus_tokens_cpu",  # same
    "rotate_input_ids_cpu",  # sglang/kernels/ops/speculative/multi_layer_eagle.py
    "verify_tree_greedy_cpu",  # sglang/kernels/ops/speculative/spec_tree.py
)
for _name in _NAMES:
    globals()[_name] = _raises(_name)
del _name
