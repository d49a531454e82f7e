"""XLA options for the jitted step that holds `jeplb.eplb_step`.

On a GPU, XLA runs a conditional (`jax.lax.cond`) or a loop (`jax.lax.while_loop`, `jax.lax.scan`
that is not unrolled) by copying its predicate to the host and waiting for it: every kernel before
it must finish before the host launches the next. `eplb_step` holds one conditional (rebalance
now or not), so an idle step pays that wait, about 0.1 ms in a decode step. With the conditional
and the loops recorded into CUDA graphs (command buffers) the GPU evaluates the predicate itself
and the host never waits.
"""

from __future__ import annotations

__all__ = ["compiler_options"]

# XLA's default command-buffer kinds (jax 0.10-0.11) plus conditionals and loops.
_GPU_COMMAND_BUFFERS = (
    "FUSION",
    "CUBLAS",
    "CUBLASLT",
    "CUSTOM_CALL",
    "CUDNN",
    "DYNAMIC_SLICE_FUSION",
    "CONDITIONAL",
    "WHILE",
)


def compiler_options(*, platform: str | None = None) -> dict[str, str]:
    """Compiler options for the jitted step that calls `jeplb.eplb_step` (pass them to `jax.jit`).

    On a GPU they put conditionals and loops into CUDA graphs, with XLA's default kinds kept, so
    a step where no rebalance is due waits for no device-to-host copy (the conditional's
    predicate); scanned layers lose the same wait on every trip. Elsewhere they are empty: TPUs
    and CPUs evaluate conditionals without the host.

    Args:
      platform: ``"gpu"``, ``"cpu"``, ``"tpu"``; None: the default backend's.

    Returns:
      A dict for ``jax.jit(step, compiler_options=...)`` (empty where nothing applies).

    Example:
      >>> import jax
      >>> sorted(compiler_options(platform="gpu"))
      ['xla_gpu_enable_command_buffer']
      >>> compiler_options(platform="cpu")
      {}
      >>> step = jax.jit(lambda x: x + 1, compiler_options=compiler_options())
      >>> int(step(1))
      2
    """
    import jax

    platform = jax.default_backend() if platform is None else platform
    if platform not in ("gpu", "cpu", "tpu", "cuda", "rocm"):
        raise ValueError(
            f"platform: expected 'gpu', 'cpu', 'tpu' or None (the default backend), got {platform!r}"
        )
    if platform in ("gpu", "cuda", "rocm"):
        return {"xla_gpu_enable_command_buffer": ",".join(_GPU_COMMAND_BUFFERS)}
    return {}
