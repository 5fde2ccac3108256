"""Quality on a real model: KL divergence against the f16 cache, perplexity, sweeps, needle retrieval
and the calibration of per-layer policies."""
