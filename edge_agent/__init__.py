"""The device side: settings, local sample store, trainer, runner, CLI."""
