"""Test configuration: 8 simulated CPU devices unless a GPU is present."""

import os


def _load_factor() -> float:
    """The 1-minute load average per core, at least 1: how much slower than quiet this machine is."""
    try:
        return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    except OSError:
        return 1.0


# Must happen before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# XLA:CPU aborts the process when a collective's participants (the simulated devices' threads) have
# not all arrived within 40 s; other work on a small machine can starve a thread that long. The
# limit grows with the load (the default on a quiet machine).
_TERMINATE = "xla_cpu_collective_call_terminate_timeout_seconds"
if _TERMINATE not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += f" --{_TERMINATE}={round(40 * _load_factor())}"

# The suite compiles a few hundred small programs and runs each for milliseconds: LLVM's
# optimisation of the generated CPU code is most of the compile time and buys nothing here (the
# HLO passes still run; results are the same bits). Benchmarks and users keep the default.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import jax  # noqa: E402 (after XLA_FLAGS)
import pytest  # noqa: E402

# Property tests draw new examples on every local run (how they found what they found); under CI
# they draw the same examples every time, so a landing run is reproducible. (The MaxText
# environment, .ci/maxtext, runs no property test and has no hypothesis.)
try:
    from hypothesis import settings
except ImportError:
    settings = None
if settings is not None:
    settings.register_profile("ci", derandomize=True)
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        settings.load_profile("ci")

from tests.helpers import mesh_of  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def _has_gpu() -> bool:
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "devices(n): needs n devices on the default backend (skipped with fewer)"
    )


def pytest_collection_modifyitems(config, items):
    # With a GPU the default backend is the GPU: tests that build an n-device mesh on it skip when
    # it has fewer devices, and the device-independent ones still run there.
    have = jax.device_count()
    gpu = _has_gpu()
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        marker = item.get_closest_marker("devices")
        if marker is not None and have < marker.args[0]:
            reason = f"needs {marker.args[0]} devices, the default backend has {have}"
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def triton_lowering(monkeypatch):
    """Pallas GPU kernels lower through Triton (as on the lent GPUs' jax), whatever this jax's
    default: for tests of the ``auto`` choices on a ``"gpu"`` platform string."""
    from jeplb._src.transfer import rows

    monkeypatch.setattr(rows, "triton_lowering", lambda: True)


@pytest.fixture(scope="session")
def cpu_devices():
    devs = jax.devices("cpu")
    assert len(devs) >= 8, "conftest must provide 8 simulated CPU devices"
    return devs[:8]


# The meshes most tests share (session-wide: a mesh is cheap, and programs compiled for it are
# cached by its devices and axes). Another mesh: `tests.helpers.mesh_of`.


@pytest.fixture(scope="session")
def mesh8():
    """8 devices on one Auto axis ``"ep"`` (skips with fewer devices)."""
    return mesh_of(8)


@pytest.fixture(scope="session")
def mesh(mesh8):
    """The default mesh of a test: `mesh8`."""
    return mesh8


@pytest.fixture(scope="session")
def mesh1():
    """1 device on one Auto axis ``"ep"``."""
    return mesh_of(1)


@pytest.fixture(scope="session")
def mesh_ep_tp():
    """8 devices as 4 x 2 on Auto axes ``("ep", "tp")`` (skips with fewer devices)."""
    return mesh_of(8, ("ep", "tp"), shape=(4, 2))


@pytest.fixture(scope="session", autouse=True)
def _bad_input_counts():
    """With JEPLB_BAD_INPUT_COUNTS=path, writes how many bad inputs each public function was
    given by the bad-input tests of this process (tests/bad_input.py)."""
    yield
    path = os.environ.get("JEPLB_BAD_INPUT_COUNTS")
    if path:
        from tests import bad_input

        bad_input.write_counts(path)
