"""Engines: paged model steps, prefill and decode engines, sampling, orchestration."""
