"""The placement policy: DeepSeek's EPLB on device, its migration-aware mode and refinement."""
