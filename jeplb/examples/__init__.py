"""Examples built on jeplb: a Flax NNX MoE transformer and a skewed, drifting router workload.

* `MoEConfig`, `MoETransformer`, `make_step`: the model (jeplb/examples/moe.py);
* `DriftingZipf`: the workload (jeplb/examples/workload.py).

`jeplb demo` runs them together.
"""

from .moe import MoEConfig as MoEConfig
from .moe import MoETransformer as MoETransformer
from .moe import make_step as make_step
from .workload import DriftingZipf as DriftingZipf
