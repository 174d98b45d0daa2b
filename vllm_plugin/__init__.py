"""vLLM out-of-tree plugin for the table-free architecture (see the vLLM plugin issue)."""
