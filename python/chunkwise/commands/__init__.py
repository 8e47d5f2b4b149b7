"""The model-driven subcommands of ``chunkwise`` (each module: its options and its run)."""
