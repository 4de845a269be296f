"""The commands tier: one module per ``hydra-kit`` subcommand, each with ``main(argv) -> int``."""
