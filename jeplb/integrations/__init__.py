"""Integrations with other frameworks, one module each, behind its own extra.

`jeplb` itself never imports these modules: import the one you use, e.g.
``from jeplb.integrations import maxtext`` (needs ``pip install "jeplb[maxtext]"``).

* `jeplb.integrations.maxtext`: MaxText 0.2.x's own MoE layer (extra ``maxtext``).
* `jeplb.integrations.prometheus`: `StepInfo` figures as Prometheus gauges (extra ``prometheus``).
"""
