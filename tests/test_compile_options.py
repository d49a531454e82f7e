"""`jeplb.compiler_options`: what it gives per platform, and that XLA takes it (the command-buffer
kinds are enum names XLA parses: a name it does not know fails the compile, on any backend)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jeplb


def test_gpu_options_keep_defaults_and_add_conditionals_and_loops():
    kinds = jeplb.compiler_options(platform="gpu")["xla_gpu_enable_command_buffer"].split(",")
    assert {"FUSION", "CUBLAS", "CUSTOM_CALL", "CONDITIONAL", "WHILE"} <= set(kinds)
    assert len(kinds) == len(set(kinds))
    assert jeplb.compiler_options(platform="cpu") == {} == jeplb.compiler_options(platform="tpu")


def test_xla_parses_the_gpu_options():
    """Compiled here with the GPU's options: XLA parses every kind (an unknown one raises)."""

    def step(x):
        return jax.lax.cond(x.sum() > 0, lambda: x + 1, lambda: x - 1)

    f = jax.jit(step, compiler_options=jeplb.compiler_options(platform="gpu"))
    assert f(jnp.ones(3)).tolist() == [2.0, 2.0, 2.0]


def test_bad_platform():
    with pytest.raises(ValueError, match=r"platform: expected 'gpu', 'cpu', 'tpu' .* got 'metal'"):
        jeplb.compiler_options(platform="metal")
