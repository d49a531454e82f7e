"""A skewed, drifting router workload: Zipf-distributed expert popularity whose hot set changes.

Real MoE routers are far from uniform: a few experts take most tokens of a batch, and which ones
changes with the data (a new language, a new task, a long document). `DriftingZipf` reproduces
that for the example model: per layer, a random ranking of the E experts and Zipf weights
``1 / rank**zipf_exponent`` give a router logit bias ``log(weight)``; every ``drift_every`` steps
the ranking is redrawn (a new hot set). Everything is a deterministic function of ``seed`` and
the step index, so a run can be repeated exactly and a step can be replayed.

Letters: L layers, E logical experts, B sequences, S tokens per sequence, H model width.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["DriftingZipf"]


def _check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < (0 if allow_zero else 1):
        raise ValueError(f"{name}: expected an int >= {0 if allow_zero else 1}, got {value}")


@dataclasses.dataclass(frozen=True)
class DriftingZipf:
    """Tokens and a per-layer router bias with Zipf-skewed expert popularity that drifts.

    Attributes:
      num_layers: L.
      num_experts: E.
      batch: B, sequences per step.
      seq_len: S, tokens per sequence (T = B * S tokens per step).
      d_model: H, width of the token vectors.
      zipf_exponent: skew; 0 is uniform, 1.0 to 1.5 is typical of measured MoE routing.
      drift_every: steps between changes of the hot set (0: never).
      seed: everything derives from it.

    Example:
      >>> w = DriftingZipf(num_layers=2, num_experts=8, batch=2, seq_len=4, d_model=16)
      >>> x, bias = w.batch_at(0)
      >>> x.shape, bias.shape
      ((2, 4, 16), (2, 8))
      >>> bool((w.batch_at(0)[0] == x).all())  # deterministic
      True
    """

    num_layers: int
    num_experts: int
    batch: int
    seq_len: int
    d_model: int
    zipf_exponent: float = 1.2
    drift_every: int = 0
    seed: int = 0

    def __post_init__(self):
        for name in ("num_layers", "num_experts", "batch", "seq_len", "d_model", "seed"):
            _check_positive(name, getattr(self, name), allow_zero=name == "seed")
        _check_positive("drift_every", self.drift_every, allow_zero=True)
        if isinstance(self.zipf_exponent, bool) or not isinstance(
            self.zipf_exponent, int | float | np.floating
        ):
            raise TypeError(f"zipf_exponent: expected a float, got {self.zipf_exponent!r}")
        if not 0 <= self.zipf_exponent <= 10:
            raise ValueError(
                f"zipf_exponent: expected a float in [0, 10], got {self.zipf_exponent}"
            )

    def phase(self, step: int) -> int:
        """Index of the hot set in force at ``step`` (changes every ``drift_every`` steps)."""
        return 0 if self.drift_every == 0 else step // self.drift_every

    def popularity(self, step: int) -> np.ndarray:
        """float64[L, E]: each expert's share of routing weight at ``step`` (rows sum to 1)."""
        ranks = np.empty((self.num_layers, self.num_experts), np.int64)
        for layer in range(self.num_layers):
            rng = np.random.default_rng((self.seed, 1, self.phase(step), layer))
            ranks[layer] = rng.permutation(self.num_experts)
        weight = 1.0 / (ranks + 1.0) ** self.zipf_exponent
        return weight / weight.sum(axis=1, keepdims=True)

    def router_bias(self, step: int) -> np.ndarray:
        """float32[L, E]: ``log(popularity)``, added to the router's logits of each layer."""
        return np.log(self.popularity(step)).astype(np.float32)

    def tokens(self, step: int) -> np.ndarray:
        """float32[B, S, H]: the step's token vectors (standard normal)."""
        rng = np.random.default_rng((self.seed, 0, step))
        return rng.standard_normal((self.batch, self.seq_len, self.d_model)).astype(np.float32)

    def batch_at(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens float32[B, S, H], router_bias float32[L, E])`` of ``step``."""
        return self.tokens(step), self.router_bias(step)
