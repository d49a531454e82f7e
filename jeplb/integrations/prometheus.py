"""Prometheus gauges of what `jeplb.eplb_step` did, for a serving stack to scrape.

Needs ``prometheus_client`` (``pip install 'jeplb[prometheus]'``); jeplb itself does not import
this module. Serve the registry the usual way (``prometheus_client.start_http_server(port)``).

Example:
  >>> import numpy as np, prometheus_client, jeplb
  >>> from jeplb.integrations.prometheus import Gauges
  >>> registry = prometheus_client.CollectorRegistry()
  >>> gauges = Gauges(registry=registry)
  >>> info = jeplb.StepInfo(step=np.int32(3), fired=np.bool_(True), skipped=np.bool_(False),
  ...                       planned_balancedness=np.float32(0.8), moved=np.array([True]),
  ...                       layer_ok=np.array([True]), in_progress=np.bool_(False),
  ...                       remote_rows=np.array([2]), layer_balancedness=np.array([0.8]),
  ...                       balancedness=np.float32(0.8))
  >>> gauges.update(info)
  >>> registry.get_sample_value("jeplb_layer_balancedness", {"layer": "0"})
  0.8
"""

from __future__ import annotations

from typing import Any

import jax

try:
    import prometheus_client
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "jeplb.integrations.prometheus needs prometheus_client: pip install 'jeplb[prometheus]'"
    ) from err

__all__ = ["Gauges"]

# Gauge name (after the prefix), StepInfo.scalars key, help text.
_GAUGES = (
    ("balancedness", "balancedness", "EPLB balancedness over all layers (mean / max device load)"),
    ("moved_layers", "moved_layers", "EPLB layers whose expert weights moved in the last step"),
    ("remote_rows", "remote_rows", "EPLB expert rows received from other devices, last step"),
    ("infeasible_layers", "infeasible_layers", "EPLB layers due to move that kept their placement"),
    ("in_progress", "in_progress", "1 while an EPLB rebalance has layers left to move"),
    ("step", "step", "EPLB steps taken"),
)


class Gauges:
    """Prometheus metrics of `jeplb.StepInfo`, updated with `Gauges.update`.

    Metrics (``prefix`` ``jeplb`` by default): ``jeplb_balancedness``,
    ``jeplb_layer_balancedness{layer="<l>"}``, ``jeplb_moved_layers``, ``jeplb_remote_rows``,
    ``jeplb_infeasible_layers``, ``jeplb_in_progress``, ``jeplb_step`` (gauges) and
    ``jeplb_rebalances_total`` (a counter of the steps that planned a rebalance).

    Args:
      registry: the `prometheus_client.CollectorRegistry` to register in (default: the global
        ``prometheus_client.REGISTRY``).
      prefix: the metric names' prefix.
    """

    def __init__(self, *, registry: Any = None, prefix: str = "jeplb"):
        if not isinstance(prefix, str) or not prefix:
            raise TypeError(f"prefix: expected a non-empty str, got {prefix!r}")
        where = {} if registry is None else {"registry": registry}
        self._gauges = {
            key: prometheus_client.Gauge(f"{prefix}_{name}", text, **where)
            for name, key, text in _GAUGES
        }
        self.layer_balancedness = prometheus_client.Gauge(
            f"{prefix}_layer_balancedness",
            "EPLB balancedness of each layer (mean / max device load)",
            ["layer"],
            **where,
        )
        self.rebalances = prometheus_client.Counter(
            f"{prefix}_rebalances", "EPLB steps that planned a rebalance", **where
        )

    def update(self, info: Any) -> None:
        """Sets the metrics from one step's `jeplb.StepInfo` (fetched from the device here: one
        transfer, a host sync; call it when the loop may sync, e.g. when ``info.fired`` or every
        N steps).

        Raises:
          TypeError: ``info`` is not a `jeplb.StepInfo`.
        """
        from jeplb._src.step import StepInfo

        if not isinstance(info, StepInfo):
            raise TypeError(f"info: expected a jeplb.StepInfo, got {type(info).__name__}")
        values = jax.device_get(info).scalars()
        for key, gauge in self._gauges.items():
            gauge.set(values[key])
        for key, value in values.items():
            if key.startswith("balancedness/layer_"):
                self.layer_balancedness.labels(layer=key.rsplit("_", 1)[1]).set(value)
        if values["fired"]:
            self.rebalances.inc()
