"""Llama-family model: config, presets, Flax modules, sharding rules and checkpoint I/O."""
