"""Exit codes of every `farmiq-edge` command (SPEC §5), shared by the CLI and the modules it runs."""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # a usage error or a bad setting
EXIT_CANNOT_CONNECT = 3
