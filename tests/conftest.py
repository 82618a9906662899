"""Test setup: 8 CPU host devices, set before jax is imported anywhere; a clean gin config
for every test (entry points finalize and lock it, which must not leak into the next test)."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gin  # noqa: E402
import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True)
def _clean_gin_config():
    gin.clear_config()
    yield
