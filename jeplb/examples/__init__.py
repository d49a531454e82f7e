"""Examples built on jeplb: a Flax NNX MoE transformer, a MaxText-style Linen MoE stack, and a
skewed, drifting router workload.

* `MoEConfig`, `MoETransformer`, `make_step`: the NNX model (jeplb/examples/moe.py);
* `maxtext_moe`: a Linen `nn.scan` stack in MaxText's layout (``wi_0``, ``wi_1``, ``wo``; the layer
  dim at ``param_scan_axis`` 0 or 1) on a ("data", "expert", "tensor") mesh, with a dense and a
  ragged_dot expert path and the top-k-order combine `maxtext_moe.combine_topk`
  (jeplb/examples/maxtext_moe.py);
* `DriftingZipf`: the workload (jeplb/examples/workload.py).

`jeplb demo` runs the NNX model and the workload together.
"""

from . import maxtext_moe as maxtext_moe
from .moe import MoEConfig as MoEConfig
from .moe import MoETransformer as MoETransformer
from .moe import make_step as make_step
from .workload import DriftingZipf as DriftingZipf
