"""The split demo (`edgetune run --mode split --encoding int8`): SmolLM2-135M, pretrained and shipped
offline, learns over a real Mosquitto, so `--split-model smollm2` starts; its GGUF is converted
once to a plain folder; a runner whose aggregator fails at start stops its agents at once instead
of waiting for them."""

from __future__ import annotations

import json
import time

import pytest
import torch

from edgetune.runner import AGENT_STOP_GRACE_S, RunOptions, run_local


@pytest.mark.slow
def test_short_split_demo_perplexity_falls_from_the_pretrained_base(mosquitto, tmp_path):
    """The demo's defaults (SmolLM2, cut 2, batch 4, lr 2e-3, int8 at the cut) on a small budget:
    1 agent, 1 round of 8 steps of 4 x 32 tokens; perplexity on 8 held-out blocks of 32 tokens."""
    opts = RunOptions(mode="split", split_encoding="int8", agents=1, rounds=1, max_local_steps=8, seq_len=32,
                      partition="iid", broker_url=mosquitto.url, output=tmp_path / "run",
                      aggregator_threads=1,  # 2 threads thrash when other jobs load the 2 cores
                      extra_env={"EDGETUNE_DATA_LIMIT": "300", "EDGETUNE_EVAL_SEQUENCES": "8",
                                 "EDGETUNE_EVAL_ROUGE_PROMPTS": "1", "EDGETUNE_EVAL_ROUGE_NEW_TOKENS": "8"})
    assert (opts.split_model, opts.split_cut, opts.split_batch_size) == ("smollm2", 2, 4)
    summary = run_local(opts, echo=lambda line: None)
    rows = [r for r in summary["rounds"] if r.get("eval") != "federated"]  # central: the same held-out blocks
    assert [r["round"] for r in rows] == [0, 1]
    fed = [r for r in summary["rounds"] if r.get("eval") == "federated"]  # the agent's own held-out blocks
    assert [r["version"] for r in fed] == [0, 1] and all(r["eval_tokens"] > 0 for r in fed)
    first, last = rows[0]["perplexity"], rows[-1]["perplexity"]
    # round 0 is the pretrained base (a random init of this vocabulary starts near 49,152)
    assert first < 500, f"round 0 perplexity {first:.1f}: not a pretrained model"
    assert last <= 0.9 * first, f"held-out perplexity {first:.1f} -> {last:.1f}: less than a 10% drop"
    assert isinstance(rows[-1]["sample_generation"], str) and rows[-1]["sample_prompt"]
    agg = tmp_path / "run" / "aggregator"
    settings = json.loads((agg / "settings.json").read_text())
    assert settings["split_model"] == "smollm2" and settings["split_lr"] == pytest.approx(2e-3)
    # `--split-model smollm2` starts: the aggregator saved its base (it used to fail there, the GGUF's quantizer)
    assert "quantization_config" not in json.loads((agg / "base_model" / "config.json").read_text())


@pytest.mark.slow
def test_smollm2_converts_once_to_a_plain_folder():
    """The GGUF is converted once into the model cache, without gguf's quantizer (a model loaded from
    the GGUF refuses save_pretrained: 'quantized with gguf and is not serializable'). The machine's
    cache: the suite's first SmolLM2 test converts (on a fresh machine), every later one reads the
    folder; converting again into a private cache here would cost the suite ~18 s for nothing new."""
    from transformers import AutoModelForCausalLM

    from common.paths import model_cache_dir
    from models.fingerprint import file_sha256
    from models.smollm2 import SOURCE_FILE, smollm2_folder, smollm2_gguf

    folder = smollm2_folder()
    assert folder.parent == model_cache_dir() and (folder / SOURCE_FILE).exists()
    assert json.loads((folder / SOURCE_FILE).read_text())["sha256"] == file_sha256(smollm2_gguf())  # made from it
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert (folder / "tokenizer.json").exists()
    t0 = time.perf_counter()
    assert smollm2_folder() == folder and time.perf_counter() - t0 < 5  # made once: no second conversion
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # tied, not a new random head


def test_agent_and_aggregator_agree_on_the_smollm2_task():
    """Both sides hash the shipped GGUF file, whichever process converted it: the agent finds the task's
    smollm2 without a model dir and builds the aggregator's decoder spec from the task."""
    from aggregator.settings import AggregatorSettings
    from broker.messages import TaskDefinition
    from edge_agent.task_model import task_spec
    from models.fingerprint import model_hash
    from models.smollm2 import smollm2_gguf

    settings = AggregatorSettings(mode="split", split_model="smollm2", split_cut=2, seq_len=64)
    agg = settings.decoder_task_fields()
    assert task_spec(TaskDefinition(**agg), []) == settings.decoder_spec()
    assert agg["model"] == "smollm2" and agg["model_hash"] == model_hash(smollm2_gguf())


def test_runner_stops_its_agents_soon_after_the_aggregator_fails_at_start(mosquitto, tmp_path):
    """An aggregator that exits with an error will never announce a final round, so its agents would
    wait for one; the runner used to wait 60 s before killing them."""
    said: list[tuple[float, str]] = []
    opts = RunOptions(agents=2, rounds=1, broker_url=mosquitto.url, output=tmp_path / "run",
                      extra_env={"EDGETUNE_EVAL_BATCH_SIZE": "0"})  # refused by the aggregator only (exit 2)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="the aggregator failed"):
        run_local(opts, echo=lambda line: said.append((time.monotonic(), line)))
    end = time.monotonic()
    noticed = next((t for t, line in said if "stopping the agents" in line), None)
    assert noticed is not None, said
    # after noticing: SIGINT, at most AGENT_STOP_GRACE_S for the agents to go offline, then kill;
    # 5 s more covers reading the log tail and a loaded machine's slow process exits
    assert end - noticed < AGENT_STOP_GRACE_S + 5, f"{end - noticed:.1f}s from noticing to return"
    assert end - t0 < 60, f"{end - t0:.1f}s in all"


def test_runner_stops_the_aggregator_when_every_agent_has_failed(mosquitto, tmp_path):
    """The agents' data has labels the task does not (a runner driven from Python, past the CLI's data
    check): each agent exits 2 when the task comes. The aggregator would wait for agents until its
    timeout; the runner stops it and says why."""
    data = tmp_path / "mine.csv"
    data.write_text("text,label\n" + "".join(f"text {i},{'yes' if i % 2 else 'no'}\n" for i in range(30)))
    opts = RunOptions(agents=1, rounds=1, broker_url=mosquitto.url, output=tmp_path / "run", agent_data=[str(data)],
                      labels=["negative", "positive"])
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"every agent exited .*mine.csv, row 2: label 'no' is not one of"):
        run_local(opts, echo=lambda line: None)
    assert time.monotonic() - t0 < 90
