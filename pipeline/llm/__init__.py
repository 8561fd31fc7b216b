"""LLM clients and the in-context learning runs over a corpus."""
