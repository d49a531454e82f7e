"""Examples built on jeplb: a Flax NNX MoE transformer, a MaxText-style Linen MoE stack,
a skewed, drifting router workload and a training loop.

* `MoEConfig`, `MoETransformer`, `make_step`: the NNX model (jeplb/examples/moe.py);
* `maxtext_moe`: a Linen `nn.scan` stack in MaxText's layout (``wi_0``, ``wi_1``, ``wo``; the layer
  dim at ``param_scan_axis`` 0 or 1) on a ("data", "expert", "tensor") mesh, with a dense and a
  ragged_dot expert path and the top-k-order combine `maxtext_moe.combine_topk`
  (jeplb/examples/maxtext_moe.py);
* `DriftingZipf`: the workload (jeplb/examples/workload.py);
* `jeplb.examples.serving`: a serving loop over per-layer weights (tpu-inference's layout) with
  prefill, decode and batch buckets, whose EPLB runs no program on idle steps
  (jeplb/examples/serving.py; jax only);
* `jeplb.examples.training`: the NNX model trained with optax Adam and EPLB (`make_train_step`,
  `train`), replicas kept identical by `jeplb.sync_replica_grads`; it needs optax, so it is
  imported on first use of its names (``from jeplb.examples import train``).

`jeplb demo` runs the NNX model and the workload together; `jeplb demo --train` runs the training
example.
"""

from . import maxtext_moe as maxtext_moe
from . import serving as serving
from .moe import MoEConfig as MoEConfig
from .moe import MoETransformer as MoETransformer
from .moe import make_step as make_step
from .workload import DriftingZipf as DriftingZipf

_TRAINING = ("TrainRun", "make_train_step", "replicas_identical", "teacher", "train")


def __getattr__(name: str):
    # The training example needs optax; importing it lazily keeps the model usable without it.
    if name in _TRAINING:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
