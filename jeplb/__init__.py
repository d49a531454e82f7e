"""jeplb: expert-parallel load balancing (EPLB) for Mixture-of-Experts models in JAX.

The public surface, by job:

* placement policy: `rebalance_experts`, `balancedness`, `device_loads`, `remote_copies`;
* configuration: `EplbConfig` (one static object: a policy such as `DeepSeekPolicy` or
  `SnakePolicy`, a `TransferConfig`, a `ScheduleConfig`, a `DispatchConfig`);
* weight transfer: `rearrange_expert_weights`, `transfer_layer`, and its two stages
  `move_to_buffer` / `move_from_buffer` joined by `TransferMetadata`, all taking their static
  options as one `TransferConfig` (or its fields as keywords);
* placement files: `write_placement`, `read_placement` and `Placement` (just the placement,
  apart from the load statistics; ``jeplb plan`` writes one from a recorded load);
* model integration: `EplbState`, `dispatch`, `dispatch_layer`, `dispatch_kept`, `eplb_step`,
  `eplb_step_local`,
  `place_experts` (logical expert weights onto the slots of a placement), `combine_topk` (a
  combine whose bits a rebalance cannot change), `expand_gating` (router scores over the slots,
  for kernels that do their own top-k);
* serving loops (per-layer weights, nothing run on idle steps): `end_pass` in the forward,
  `plan_rebalance` and `move_layer` in their own programs, `HostSchedule` deciding on the host;
* elastic expert parallelism: `recover_experts`;
* training: `sync_replica_grads`, `sync_replica_grads_local` (replica gradients summed so that
  replicas stay identical), `expert_state` (the optimizer state that moves with the experts),
  `replica_scale` and `global_norm` (norms that count each logical expert once).
"""

from jeplb._src.combine import combine_topk as combine_topk
from jeplb._src.config import DispatchConfig as DispatchConfig
from jeplb._src.config import EplbConfig as EplbConfig
from jeplb._src.config import ScheduleConfig as ScheduleConfig
from jeplb._src.dispatch import dispatch as dispatch
from jeplb._src.dispatch import dispatch_kept as dispatch_kept
from jeplb._src.dispatch import dispatch_layer as dispatch_layer
from jeplb._src.elastic import Recovery as Recovery
from jeplb._src.elastic import recover_experts as recover_experts
from jeplb._src.gating import expand_gating as expand_gating
from jeplb._src.metrics import Balance as Balance
from jeplb._src.metrics import balancedness as balancedness
from jeplb._src.metrics import device_loads as device_loads
from jeplb._src.metrics import remote_copies as remote_copies
from jeplb._src.placement_file import Placement as Placement
from jeplb._src.placement_file import read_placement as read_placement
from jeplb._src.placement_file import write_placement as write_placement
from jeplb._src.policy.api import DeepSeekPolicy as DeepSeekPolicy
from jeplb._src.policy.api import rebalance_experts as rebalance_experts
from jeplb._src.policy.base import Policy as Policy
from jeplb._src.policy.snake import SnakePolicy as SnakePolicy
from jeplb._src.serving import HostSchedule as HostSchedule
from jeplb._src.serving import PlanInfo as PlanInfo
from jeplb._src.serving import end_pass as end_pass
from jeplb._src.serving import move_layer as move_layer
from jeplb._src.serving import plan_rebalance as plan_rebalance
from jeplb._src.state import EplbState as EplbState
from jeplb._src.step import StepInfo as StepInfo
from jeplb._src.step import eplb_step as eplb_step
from jeplb._src.step import eplb_step_local as eplb_step_local
from jeplb._src.training import expert_state as expert_state
from jeplb._src.training import global_norm as global_norm
from jeplb._src.training import replica_scale as replica_scale
from jeplb._src.training import sync_replica_grads as sync_replica_grads
from jeplb._src.training import sync_replica_grads_local as sync_replica_grads_local
from jeplb._src.transfer.api import TransferReport as TransferReport
from jeplb._src.transfer.api import rearrange_expert_weights as rearrange_expert_weights
from jeplb._src.transfer.api import transfer_layer as transfer_layer
from jeplb._src.transfer.buffer import move_from_buffer as move_from_buffer
from jeplb._src.transfer.buffer import move_to_buffer as move_to_buffer
from jeplb._src.transfer.config import TransferConfig as TransferConfig
from jeplb._src.transfer.plan import TransferMetadata as TransferMetadata
from jeplb._src.weights import place_experts as place_experts

__version__ = "0.2.0"

__all__ = [
    "Balance",
    "DeepSeekPolicy",
    "DispatchConfig",
    "EplbConfig",
    "EplbState",
    "HostSchedule",
    "Placement",
    "PlanInfo",
    "Policy",
    "Recovery",
    "ScheduleConfig",
    "SnakePolicy",
    "StepInfo",
    "TransferConfig",
    "TransferMetadata",
    "TransferReport",
    "balancedness",
    "combine_topk",
    "device_loads",
    "dispatch",
    "dispatch_kept",
    "dispatch_layer",
    "end_pass",
    "eplb_step",
    "eplb_step_local",
    "expand_gating",
    "expert_state",
    "global_norm",
    "move_from_buffer",
    "move_layer",
    "move_to_buffer",
    "place_experts",
    "plan_rebalance",
    "read_placement",
    "rearrange_expert_weights",
    "rebalance_experts",
    "recover_experts",
    "remote_copies",
    "replica_scale",
    "sync_replica_grads",
    "sync_replica_grads_local",
    "transfer_layer",
    "write_placement",
]
