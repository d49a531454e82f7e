"""The weight transfer: plan, map agreement, row kernels, in-place order, stages, engine."""
