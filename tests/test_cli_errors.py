"""A user's mistake on `edgetune run` fails at once, before any process starts, with what to do and
no traceback; the checks that need no model code run without importing torch. `--version` on
every command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgetune.local_broker import free_port
from tests.conftest import ROOT, child_env

# runs CLI command lines one after the other in one fresh interpreter (an interpreter each would
# cost the suite a second apiece) and reports, after each, its exit code, its output and whether
# torch has been imported so far: a case that imported torch shows in its own result and in every
# later one, so the torch-free cases run together and before any case that may import it
PROBE = """
import contextlib, io, json, os, sys, traceback
results = []
for module, args, env in json.loads(sys.argv[1]):
    os.environ.update(env)
    out, code = io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        sys.argv = ["edgetune", *args]
        try:
            __import__(module, fromlist=["app"]).app()
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = "uncaught"
    for k in env:
        os.environ.pop(k)
    results.append({"code": code, "out": out.getvalue(), "torch": "torch" in sys.modules})
print(json.dumps(results))
"""


def clis(cases: list[tuple[str, list[str], dict]]) -> list[tuple[int, str, bool]]:
    """(exit code, stdout + stderr, whether torch was imported by then) of each (module, args, env)."""
    p = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], cwd=ROOT, env=child_env(COLUMNS="200"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip(), p.stdout[-3000:] + p.stderr[-3000:]
    return [(r["code"], r["out"], r["torch"]) for r in json.loads(p.stdout.strip().splitlines()[-1])]


def started_nothing(out: str) -> bool:
    """The runner prints these lines when it starts a broker or processes."""
    return not any(line.startswith(("broker:", "started the aggregator")) for line in out.splitlines())


BAD_OPTIONS = [
    (["--strategy-options", "{bad"], 2, "--strategy-options is not JSON"),
    (["--strategy-options", "[1, 2]"], 2, "must be a JSON object"),
    (["--strategy", "nope"], 2, "'nope' is not one of 'fedavg'"),
    (["--mode", "splitt"], 2, "'splitt' is not one of 'federated', 'split'"),
    (["--aggregation", "later"], 2, "'later' is not one of 'sync', 'async'"),
    (["--encoding", "int4"], 2, "'int4' is not one of 'fp32', 'fp16', 'int8'"),
    (["--progress", "sometimes"], 2, "'sometimes' is not one of 'auto', 'tty', 'plain', 'off'"),
    (["--broker", "http://somewhere"], 2, "scheme must be mqtt:// or mqtts://"),
]
VERSION_MODULES = ["edgetune.cli", "edge_agent.cli", "aggregator.cli"]


@pytest.fixture(scope="module")
def torch_free(tmp_path_factory):
    """Every case that must not import torch, run in one interpreter: keyed by a name per case."""
    tmp = tmp_path_factory.mktemp("cli")
    empty = tmp / "not-a-model"
    empty.mkdir()
    port = free_port()  # nothing listens there
    cases = {f"bad{i}": ("edgetune.cli", ["run", *args], {}) for i, (args, _, _) in enumerate(BAD_OPTIONS)}
    cases["no-split-model"] = ("edgetune.cli", ["run", "--mode", "split", "--split-model", str(tmp / "gone")], {})
    cases["empty-model"] = ("edgetune.cli", ["run"], {"EDGETUNE_MODEL": str(empty)})
    cases["no-broker"] = ("edgetune.cli", ["run", "--broker", f"mqtt://127.0.0.1:{port}"], {})
    cases.update({f"version-{m}": (m, ["--version"], {}) for m in VERSION_MODULES})
    results = dict(zip(cases, clis(list(cases.values()))))
    results["port"] = port
    return results


@pytest.mark.parametrize("i", range(len(BAD_OPTIONS)), ids=[a[0] for a, _, _ in BAD_OPTIONS])
def test_edgetune_run_refuses_bad_options_before_starting_anything_or_importing_torch(torch_free, i):
    _, code, says = BAD_OPTIONS[i]
    got, out, torch_imported = torch_free[f"bad{i}"]
    assert got == code and says in out, out
    assert "Traceback" not in out and started_nothing(out) and not torch_imported, out


@pytest.mark.parametrize("case, says", [("no-split-model", "no model at"), ("empty-model", "holds no config.json")])
def test_a_missing_model_folder_is_refused_before_starting_anything_or_importing_torch(torch_free, case, says):
    got, out, torch_imported = torch_free[case]
    assert got == 2 and says in out and "nothing started" in out, out
    assert "Traceback" not in out and started_nothing(out) and not torch_imported, out


def test_an_unreachable_broker_is_refused_before_starting_anything(torch_free):
    got, out, torch_imported = torch_free["no-broker"]
    port = torch_free["port"]
    assert got == 3 and f"no broker at 127.0.0.1:{port}" in out and "is it running" in out, out
    assert "Traceback" not in out and started_nothing(out) and not torch_imported, out


def test_strategy_options_the_aggregator_would_refuse_fail_before_anything_starts():
    """The aggregator's own settings check them (building the strategy imports torch); still nothing starts."""
    cases = [(["--strategy", "krum", "--strategy-options", '{"f": -1}'], "invalid options for strategy 'krum'"),
             (["--aggregation", "async", "--strategy-options", '{"bound": 1}'],
              "leave strategy at fedavg and strategy_options empty")]
    for (args, says), (got, out, _) in zip(cases, clis([("edgetune.cli", ["run", *a], {}) for a, _ in cases])):
        assert got == 2 and says in out and "nothing started" in out, out
        assert "Traceback" not in out and started_nothing(out), out


@pytest.mark.parametrize("module", VERSION_MODULES)
def test_version(torch_free, module):
    from broker.messages import PROTOCOL_VERSION

    got, out, torch_imported = torch_free[f"version-{module}"]
    assert got == 0 and f"(wire protocol {PROTOCOL_VERSION})" in out and out.startswith("edgetune "), out
    assert not torch_imported, out


def test_the_torch_free_strategy_names_are_the_registrys():
    from aggregator.strategies import STRATEGIES
    from aggregator.strategy_names import STRATEGY_NAMES

    assert sorted(STRATEGY_NAMES) == sorted(STRATEGIES)
