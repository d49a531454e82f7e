"""The test helpers themselves: a check built on them must be able to fail."""

import jax
import jax.numpy as jnp
import numpy as np

from tests.transfer_model import compilations


def test_compilations_sees_a_compilation():
    # `assert seen == []` in other tests means "nothing compiled" only if the listener fires at
    # all: a fresh function (never seen by jax's caches) must be counted.
    fresh = jax.jit(lambda x: x * 3 + 1)
    with compilations() as seen:
        out = fresh(jnp.arange(5, dtype=np.int32))
    assert len(seen) >= 1, "the backend-compile event was not seen: compilations() counts nothing"
    np.testing.assert_array_equal(np.asarray(out), np.arange(5) * 3 + 1)
    with compilations() as seen:
        fresh(jnp.arange(5, dtype=np.int32))
    assert seen == []
