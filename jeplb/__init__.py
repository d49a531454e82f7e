"""jeplb: expert-parallel load balancing (EPLB) for Mixture-of-Experts models in JAX."""

__version__ = "0.1.0"
