"""The `tablefree` command line (and, later, the OpenAI-compatible server)."""
