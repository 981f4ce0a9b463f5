"""`edgetune-agent predict` / `feedback` against a state dir: typed errors with exit codes, nothing
stored on bad input, and predictions through ONNX Runtime without importing torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from edge_agent.cli import EXIT_INPUT, EXIT_STATE, app
from edge_agent.local_settings import CURRENT_FILE, MODELS_DIR, STORE_FILE
from edge_agent.store import SampleStore
from tests.conftest import ROOT, child_env, join_demo_task
from tests.onnx_support import export_served_model

runner = CliRunner()


def invoke(*args: str, env: dict | None = None):
    return runner.invoke(app, list(args), env={"EDGETUNE_STATE_DIR": "", **(env or {})})


def rows(state):
    with SampleStore(state / STORE_FILE) as s:
        return [(x.text, x.label, x.source) for x in s.labelled()], s.count()


def test_feedback_stores_a_labelled_sample(tmp_path):
    join_demo_task(tmp_path)
    r = invoke("feedback", "a fine film", "--label", "positive", "--state-dir", str(tmp_path))
    assert r.exit_code == 0, r.output
    r = invoke("feedback", "a dull film", "--label", "0", env={"EDGETUNE_STATE_DIR": str(tmp_path)})
    assert r.exit_code == 0, r.output
    assert "stored sample 2 (negative)" in r.output
    assert rows(tmp_path) == ([("a fine film", 1, "feedback"), ("a dull film", 0, "feedback")], 2)


@pytest.mark.parametrize("text,label,says", [
    ("fine", "meh", "unknown label 'meh'"),
    ("fine", "2", "label 2 is out of range"),
    ("fine", "-1", "out of range"),
    ("   ", "positive", "text is empty"),
    ("x" * 2001, "positive", "the limit is 2000"),
])
def test_bad_feedback_exits_2_and_stores_nothing(tmp_path, text, label, says):
    join_demo_task(tmp_path)
    r = invoke("feedback", text, "--label", label, "--state-dir", str(tmp_path))
    assert r.exit_code == EXIT_INPUT, r.output
    assert says in r.output and "nothing stored" in r.output
    assert rows(tmp_path) == ([], 0)


def test_no_state_dir_says_what_to_set(tmp_path):
    for args in (["predict", "hello"], ["feedback", "hello", "--label", "positive"]):
        r = invoke(*args)
        assert r.exit_code == EXIT_STATE, r.output
        assert "EDGETUNE_STATE_DIR" in r.output
    r = invoke("feedback", "hello", "--label", "1", "--state-dir", str(tmp_path / "missing"))
    assert r.exit_code == EXIT_STATE and "does not exist" in r.output
    assert not (tmp_path / "missing").exists()


def test_predict_before_the_agent_exported_a_model(tmp_path):
    r = invoke("predict", "hello", "--state-dir", str(tmp_path))
    assert r.exit_code == EXIT_STATE
    assert "no exported model" in r.output and "edgetune-agent run" in r.output
    (tmp_path / MODELS_DIR).mkdir()
    (tmp_path / MODELS_DIR / CURRENT_FILE).write_text("gone\n")
    r = invoke("predict", "hello", "--state-dir", str(tmp_path))
    assert r.exit_code == EXIT_STATE and "restart the agent" in r.output


def test_predict_refuses_an_empty_text(tmp_path):
    r = invoke("predict", "ok", " ", "--state-dir", str(tmp_path))
    assert r.exit_code == EXIT_INPUT and "text 2 is empty" in r.output


def test_a_broken_model_folder_is_a_state_error(tmp_path):
    d = tmp_path / MODELS_DIR / "m1"
    d.mkdir(parents=True)
    (d / "model_meta.json").write_text("{not json")
    (tmp_path / MODELS_DIR / CURRENT_FILE).write_text("m1\n")
    r = invoke("predict", "hello", "--state-dir", str(tmp_path))
    assert r.exit_code == EXIT_STATE and "re-export" in r.output


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A state dir with a real exported (int8) model in service; returns its model folder."""
    return export_served_model(tmp_path_factory.mktemp("state"))


def test_predict_model_option_takes_an_exported_folder(tmp_path, served):
    """--model DIR: an exported ONNX folder given by the user, no state dir needed; one that is not
    a model folder is bad input (exit 2), not a state error."""
    r = invoke("predict", "hello", "--model", str(tmp_path))
    assert r.exit_code == EXIT_INPUT, r.output
    assert "model_meta.json is missing" in r.output
    d = served
    r = invoke("predict", "what a wonderful day", "--json", "--model", str(d))
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert got["model"] == d.name and got["label"] in ("negative", "positive") and len(got["probabilities"]) == 2


def test_predict_uses_onnx_runtime_without_torch(served):
    """A real exported (int8) model in the state dir; `predict` in a fresh process never imports torch."""
    from edge_agent.inference import OnnxPredictor

    d, state = served, served.parent.parent
    texts = ["what a wonderful day", "this is terrible", "meh"]
    code = textwrap.dedent(f"""
        import sys
        from edge_agent.cli import app
        try:
            app({["predict", *texts, "--json", "--state-dir", str(state)]!r})
        except SystemExit as e:
            assert not e.code, e.code
        heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "transformers", "peft"}})
        print("HEAVY", heavy)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout
    got = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    want_ids, want_p = OnnxPredictor(d).predict(texts)
    assert [x["text"] for x in got] == texts
    assert [x["label_id"] for x in got] == want_ids
    assert [x["label"] for x in got] == [("negative", "positive")[i] for i in want_ids]
    assert all(x["model"] == d.name for x in got)
    assert max(abs(a - b) for x, row in zip(got, want_p) for a, b in zip(x["probabilities"], row)) < 1e-5
