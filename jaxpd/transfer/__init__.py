"""KV transports: move a request's pages from a prefill mesh's pool to a decode mesh's pool."""
