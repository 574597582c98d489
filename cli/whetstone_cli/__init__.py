"""The `whetstone` command: one module per subcommand, each reaching the operator or the trainer lazily, so
the operator image (no torch) and the trainer image (no kopf) both run it."""
