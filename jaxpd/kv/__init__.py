"""KV cache: the layout contract between prefill and decode, page pools, block allocation."""
