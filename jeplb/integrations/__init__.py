"""Integrations with other frameworks, one module each, imported on demand (each behind an extra):

* `jeplb.integrations.prometheus`: `StepInfo` figures as Prometheus gauges (extra ``prometheus``).
"""
