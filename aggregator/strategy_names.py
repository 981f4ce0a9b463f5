"""The strategies' names, importable without torch (for command lines that check a choice before
anything heavy loads). tests/test_cli_errors.py checks that it lists exactly the registry's."""

STRATEGY_NAMES = ("fedavg", "fedadam", "fedyogi", "median", "trimmed_mean", "krum", "clip", "dp_fedavg")
