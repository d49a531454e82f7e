"""jeplb: expert-parallel load balancing (EPLB) for Mixture-of-Experts models in JAX."""

from ._plan import TransferMetadata as TransferMetadata
from ._transfer import TransferReport as TransferReport
from ._transfer import move_from_buffer as move_from_buffer
from ._transfer import move_to_buffer as move_to_buffer
from ._transfer import rearrange_expert_weights as rearrange_expert_weights
from ._transfer import transfer_layer as transfer_layer

__version__ = "0.1.0"
