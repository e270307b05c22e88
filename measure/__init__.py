"""The measuring half of qtc: evaluation on Chinese tasks with intervals, parity across backends, layer-skip
sweeps, inspection, per-layer sensitivity and the mixed precision it drives."""
