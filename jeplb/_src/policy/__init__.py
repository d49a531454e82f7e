"""The placement policy: DeepSeek's EPLB on device, its migration-aware mode and refinement.

Modules: `api` (the entry point, `rebalance_experts`), `checks` (its argument checks), `loads`
(float32 loads with their proportions kept), `deepseek` (the from-scratch policy), `refine` (swap
refinement), `migration` (the migration-aware mode), `ops` (row-wise helpers).
"""
