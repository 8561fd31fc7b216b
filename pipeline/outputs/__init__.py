"""What jobs write and how it is read back: the sharded commit protocol, Parquet schemas, the typed
contracts between stages (manifests, cards, the tokenizer loader) and the lexical corpus."""
