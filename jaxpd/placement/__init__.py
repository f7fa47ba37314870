"""The cost-aware placer: hardware catalog, calibrated cost model, simulator, placer."""
