"""A user's mistake on `edgetune run` fails at once, before any process starts, with what to do and
no traceback; the checks that need no model code run without importing torch. `--version` on
every command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgetune.local_broker import free_port
from tests.conftest import ROOT, child_env

# runs a CLI in a fresh interpreter and reports, after it exits, whether torch was imported
PROBE = """
import sys
module, sys.argv = sys.argv[1], ["edgetune"] + sys.argv[2:]
code = 0
try:
    __import__(module, fromlist=["app"]).app()
except SystemExit as e:
    code = e.code
print("TORCH-IMPORTED" if "torch" in sys.modules else "TORCH-NOT-IMPORTED", file=sys.stderr)
sys.exit(code)
"""


def cli(module: str, *args: str, **env: str) -> tuple[int, str, bool]:
    """(exit code, stdout + stderr, whether torch was imported) of `module`'s CLI with `args`."""
    p = subprocess.run([sys.executable, "-c", PROBE, module, *args], cwd=ROOT, env=child_env(COLUMNS="200", **env),
                       capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert "TORCH-IMPORTED" in out or "TORCH-NOT-IMPORTED" in out, out
    return p.returncode, out, "TORCH-IMPORTED" in out


def started_nothing(out: str) -> bool:
    """The runner prints these lines when it starts a broker or processes."""
    return not any(line.startswith(("broker:", "started the aggregator")) for line in out.splitlines())


@pytest.mark.parametrize("args,code,says", [
    (["--strategy-options", "{bad"], 2, "--strategy-options is not JSON"),
    (["--strategy-options", "[1, 2]"], 2, "must be a JSON object"),
    (["--strategy", "nope"], 2, "'nope' is not one of 'fedavg'"),
    (["--mode", "splitt"], 2, "'splitt' is not one of 'federated', 'split'"),
    (["--aggregation", "later"], 2, "'later' is not one of 'sync', 'async'"),
    (["--encoding", "int4"], 2, "'int4' is not one of 'fp32', 'fp16', 'int8'"),
    (["--progress", "sometimes"], 2, "'sometimes' is not one of 'auto', 'tty', 'plain', 'off'"),
    (["--broker", "http://somewhere"], 2, "scheme must be mqtt:// or mqtts://"),
])
def test_edgetune_run_refuses_bad_options_before_starting_anything_or_importing_torch(args, code, says):
    got, out, torch_imported = cli("edgetune.cli", "run", *args)
    assert got == code and says in out, out
    assert "Traceback" not in out and started_nothing(out) and not torch_imported, out


def test_a_missing_model_folder_is_refused_before_starting_anything_or_importing_torch(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    for args, env, says in ((["--mode", "split", "--split-model", str(tmp_path / "gone")], {}, "no model at"),
                            ([], {"EDGETUNE_MODEL": str(empty)}, "holds no config.json")):
        got, out, torch_imported = cli("edgetune.cli", "run", *args, **env)
        assert got == 2 and says in out and "nothing started" in out, out
        assert "Traceback" not in out and started_nothing(out) and not torch_imported, out


def test_an_unreachable_broker_is_refused_before_starting_anything():
    port = free_port()  # nothing listens there
    got, out, torch_imported = cli("edgetune.cli", "run", "--broker", f"mqtt://127.0.0.1:{port}")
    assert got == 3 and f"no broker at 127.0.0.1:{port}" in out and "is it running" in out, out
    assert "Traceback" not in out and started_nothing(out) and not torch_imported, out


def test_strategy_options_the_aggregator_would_refuse_fail_before_anything_starts():
    """The aggregator's own settings check them (building the strategy imports torch); still nothing starts."""
    for args, says in ((["--strategy", "krum", "--strategy-options", '{"f": -1}'], "invalid options for strategy 'krum'"),
                       (["--aggregation", "async", "--strategy-options", '{"bound": 1}'],
                        "leave strategy at fedavg and strategy_options empty")):
        got, out, _ = cli("edgetune.cli", "run", *args)
        assert got == 2 and says in out and "nothing started" in out, out
        assert "Traceback" not in out and started_nothing(out), out


@pytest.mark.parametrize("module", ["edgetune.cli", "edge_agent.cli", "aggregator.cli"])
def test_version(module):
    from broker.messages import PROTOCOL_VERSION

    got, out, torch_imported = cli(module, "--version")
    assert got == 0 and f"(wire protocol {PROTOCOL_VERSION})" in out and out.startswith("edgetune "), out
    assert not torch_imported, out


def test_the_torch_free_strategy_names_are_the_registrys():
    from aggregator.strategies import STRATEGIES
    from aggregator.strategy_names import STRATEGY_NAMES

    assert sorted(STRATEGY_NAMES) == sorted(STRATEGIES)
