"""jeplb: expert-parallel load balancing (EPLB) for Mixture-of-Experts models in JAX.

The public surface, by job:

* placement policy: `rebalance_experts`, `balancedness`, `device_loads`, `remote_copies`;
* weight transfer: `rearrange_expert_weights`, `transfer_layer`, and its two stages
  `move_to_buffer` / `move_from_buffer` joined by `TransferMetadata`;
* model integration: `EplbState`, `dispatch`, `dispatch_layer`, `eplb_step`, `eplb_step_local`.
"""

from ._balance import Balance as Balance
from ._balance import balancedness as balancedness
from ._balance import device_loads as device_loads
from ._balance import remote_copies as remote_copies
from ._dispatch import dispatch as dispatch
from ._dispatch import dispatch_layer as dispatch_layer
from ._elastic import Recovery as Recovery
from ._elastic import recover_experts as recover_experts
from ._plan import TransferMetadata as TransferMetadata
from ._policy import rebalance_experts as rebalance_experts
from ._state import EplbState as EplbState
from ._step import StepInfo as StepInfo
from ._step import eplb_step as eplb_step
from ._step import eplb_step_local as eplb_step_local
from ._transfer import TransferReport as TransferReport
from ._transfer import move_from_buffer as move_from_buffer
from ._transfer import move_to_buffer as move_to_buffer
from ._transfer import rearrange_expert_weights as rearrange_expert_weights
from ._transfer import transfer_layer as transfer_layer

__version__ = "0.1.0"
