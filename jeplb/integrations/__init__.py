"""Adapters for JAX model frameworks, each in its own module behind its own extra.

`jeplb` itself never imports these modules: import the one for your framework, e.g.
``from jeplb.integrations import maxtext`` (needs ``pip install "jeplb[maxtext]"``).
"""
