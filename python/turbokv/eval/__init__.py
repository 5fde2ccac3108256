"""Evaluation of compressed caches on a real model: KL divergence against the f16 cache, perplexity, sweeps."""
