"""The server side: settings, strategies, the round loop, the split server, checkpoints, CLI."""
