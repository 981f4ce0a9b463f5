"""The model card of a checkpoint: a Hugging Face style README.md (YAML front matter + Markdown).

`render_model_card(facts)` is pure: what was trained (base model, labels, mode, strategy and its
options, rounds) and how it went (figures per round, examples per agent) in, Markdown out. It
renders only those figures and counts, never an example, a text or a path of this machine.

Beside README.md a checkpoint holds `model_card.json` (the `CardFacts`), so that
`refresh_model_card(checkpoint, rows, examples_per_agent)` can re-render the card later with
more figures, and `edgetune export` can render the card of the merged model.

    write_checkpoint_card(path, settings, round, version, extra)   the aggregator's hook, per checkpoint
    refresh_model_card(path, rows, examples_per_agent)             re-render with the service's figures
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

CARD_FILE = "README.md"
FACTS_FILE = "model_card.json"
FIGURES = ("accuracy", "macro_f1", "loss")  # per-round figures a card shows, in this order
ROW_KEYS = ("round", *FIGURES, "eval")  # all a card keeps of a metrics row
EVAL_WHERE = {"central": "central (the aggregator's held-out set)",
              "federated": "federated (on the agents' own held-out data)"}


@dataclass
class CardFacts:
    """What a card says; model_card.json holds it. `rows` are metrics rows reduced to ROW_KEYS."""

    base_model: str | None
    labels: list[str]
    mode: str = "federated"
    strategy: str | None = None
    strategy_options: dict[str, Any] = field(default_factory=dict)
    aggregation: str | None = None
    rounds: int = 0  # rounds run: the checkpoint's round
    rounds_planned: int | None = None
    version: int | None = None  # the global adapter's version
    rows: list[dict[str, Any]] = field(default_factory=list)
    examples_per_agent: dict[str, int] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)  # num_layers, max_length, lora_r, lora_alpha, target_modules

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "CardFacts":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})


def card_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Metrics rows (metrics.jsonl's, or any dicts) reduced to what a card shows: ROW_KEYS, and only
    rows with a round and at least one figure; one row per round (the last given), by round."""
    by_round: dict[int, dict[str, Any]] = {}
    for r in rows:
        kept = {k: r[k] for k in ROW_KEYS if r.get(k) is not None}
        if "round" in kept and any(k in kept for k in FIGURES):
            by_round[int(kept["round"])] = kept
    return [by_round[k] for k in sorted(by_round)]


# -- rendering (pure) ----------------------------------------------------------------------------
def _yaml_str(s: str) -> str:
    return json.dumps(str(s))  # a JSON string is a YAML string, whatever it holds


def _cell(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4f}"
    return str(x).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _front_matter(f: CardFacts, merged: bool) -> list[str]:
    lines = ["---"]
    if f.base_model:
        lines.append(f"base_model: {_yaml_str(f.base_model)}")
    lines += [f"library_name: {'transformers' if merged else 'peft'}", "pipeline_tag: text-classification",
              "tags:", *[f"- {t}" for t in ("edgetune", "federated-learning", "lora", "text-classification")]]
    if f.strategy:
        lines.append(f"- {_yaml_str(f.strategy)}")
    return lines + ["---", ""]


def _training(f: CardFacts) -> list[str]:
    opts = f" with options `{json.dumps(f.strategy_options, sort_keys=True)}`" if f.strategy_options else ""
    planned = f" of {f.rounds_planned} planned" if f.rounds_planned else ""
    lines = ["## Training", "",
             f"- mode: {f.mode} (each agent trains the LoRA adapter on its own data; the aggregator combines "
             "the adapters; no example leaves a device)",
             f"- strategy: {f.strategy or 'unknown'}{opts}"]
    if f.aggregation:
        lines.append(f"- aggregation: {f.aggregation}")
    lines.append(f"- rounds run: {f.rounds}{planned}" + (f" (global adapter v{f.version})" if f.version is not None else ""))
    m = f.model
    if m:
        parts = [f"encoder layers kept: {m['num_layers']}" if m.get("num_layers") else None,
                 f"LoRA r={m['lora_r']} alpha={m['lora_alpha']}" if "lora_r" in m else None,
                 f"on {', '.join(m['target_modules'])}" if m.get("target_modules") else None,
                 f"texts cut at {m['max_length']} tokens" if m.get("max_length") else None]
        lines.append("- model: " + ", ".join(p for p in parts if p))
    return lines + [""]


def _figures(f: CardFacts) -> list[str]:
    rows = card_rows(f.rows)
    if not rows:
        return ["## Figures per round", "", "No evaluated round yet.", ""]
    cols = [k for k in FIGURES if any(k in r for r in rows)]
    names = {"accuracy": "accuracy", "macro_f1": "macro F1", "loss": "loss"}
    where = any("eval" in r for r in rows)
    header = ["round", *(names[c] for c in cols)] + (["evaluated"] if where else [])
    body = [[r["round"], *(r.get(c, "") for c in cols)]
            + ([EVAL_WHERE.get(r.get("eval", ""), r.get("eval", ""))] if where else []) for r in rows]
    return ["## Figures per round", "", *_table(header, body), ""]


def _examples(f: CardFacts) -> list[str]:
    if not f.examples_per_agent:
        return []
    items = sorted(f.examples_per_agent.items())
    total = sum(int(n) for _, n in items)
    return ["## Examples per agent", "", "How many labelled examples each agent trained on (counts only; "
            "the examples stayed on the devices).", "",
            *_table(["agent", "examples"], [*items, ["**total**", total]]), ""]


def _usage(merged: bool) -> list[str]:
    if merged:
        load = ['model = AutoModelForSequenceClassification.from_pretrained("PATH/TO/THIS/FOLDER")',
                'tok = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")']
        imports = "from transformers import AutoModelForSequenceClassification, AutoTokenizer"
        cli = "edgetune predict PATH/TO/THIS/FOLDER \"some text\""
    else:
        load = ['base = AutoModelForSequenceClassification.from_pretrained("PATH/TO/RUN/base_model")',
                'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/FOLDER")',
                'tok = AutoTokenizer.from_pretrained("PATH/TO/RUN/base_model")']
        imports = ("from peft import PeftModel\n"
                   "from transformers import AutoModelForSequenceClassification, AutoTokenizer")
        cli = "edgetune predict PATH/TO/THIS/FOLDER \"some text\"\nedgetune export PATH/TO/THIS/FOLDER OUT [--onnx]"
    return ["## Use it", "", "```python", imports, "", *load,
            'probs = model(**tok(["some text"], return_tensors="pt")).logits.softmax(-1)',
            "print({model.config.id2label[i]: float(p) for i, p in enumerate(probs[0])})", "```", "",
            "```sh", cli, "```", ""]


def render_model_card(facts: CardFacts, *, merged: bool = False) -> str:
    """README.md for a checkpoint (peft adapter) or, `merged`, for an exported model with the LoRA
    merged into its base. Pure: the facts in, Markdown out."""
    f = facts
    base = f"`{f.base_model}`" if f.base_model else "its base model"
    what = (f"a standalone model: {base} with the LoRA adapter merged into its weights (no peft needed)" if merged
            else f"a LoRA adapter (peft) for {base}")
    labels = _table(["id", "label"], list(enumerate(f.labels)))
    lines = [*_front_matter(f, merged), f"# EdgeTune text classifier: {', '.join(f.labels)}", "",
             f"Trained with federated learning by EdgeTune: {what}, that classifies texts into "
             f"{len(f.labels)} classes. This card holds figures and counts only, no training data.", "",
             "## Labels", "", *labels, "", *_training(f), *_figures(f), *_examples(f), *_usage(merged)]
    return "\n".join(lines)


# -- files ---------------------------------------------------------------------------------------
def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_model_card(folder: str | Path, facts: CardFacts, *, merged: bool = False) -> Path:
    """Write README.md (and model_card.json) into `folder`; returns the README's path."""
    folder = Path(folder)
    _write(folder / FACTS_FILE, json.dumps(asdict(facts), indent=2, sort_keys=True) + "\n")
    _write(folder / CARD_FILE, render_model_card(facts, merged=merged))
    return folder / CARD_FILE


def read_card_facts(folder: str | Path) -> CardFacts | None:
    """The facts a checkpoint's card was rendered from, or None (a checkpoint without a card)."""
    path = Path(folder) / FACTS_FILE
    if not path.is_file():
        return None
    return CardFacts.from_json(json.loads(path.read_text()))


def refresh_model_card(checkpoint_dir: str | Path, rows: Sequence[Mapping[str, Any]],
                       examples_per_agent: Mapping[str, int]) -> Path:
    """Re-render a checkpoint's card with these figures per round (metrics rows: round, accuracy,
    macro_f1, loss, eval; other keys are ignored) and examples per agent, replacing the ones it had.
    Rows after the checkpoint's round are left out. Raises FileNotFoundError for a folder
    without model_card.json (one written before cards, or not a checkpoint)."""
    facts = read_card_facts(checkpoint_dir)
    if facts is None:
        raise FileNotFoundError(f"{checkpoint_dir} has no {FACTS_FILE}: it is not a checkpoint with a model card")
    facts.rows = [r for r in card_rows(rows) if not facts.rounds or r["round"] <= facts.rounds]
    facts.examples_per_agent = {str(a): int(n) for a, n in examples_per_agent.items()}
    return write_model_card(checkpoint_dir, facts)


def _previous_facts(checkpoint_dir: Path, round_number: int) -> CardFacts | None:
    """The card of the newest earlier round beside this checkpoint (its figures carry over)."""
    earlier = sorted(d for d in checkpoint_dir.parent.glob("round-*")
                     if d.is_dir() and d.name[6:].isdigit() and int(d.name[6:]) < round_number)
    for d in reversed(earlier):
        if (facts := read_card_facts(d)) is not None:
            return facts
    return None


def write_checkpoint_card(checkpoint_dir: str | Path, settings, round_number: int, version: int,
                          extra: Mapping[str, Any]) -> Path:
    """The aggregator's hook, once per checkpoint: the card from the aggregator's settings, this
    round's evaluation (`extra`: accuracy, loss, macro_f1 when present; evaluated centrally unless
    extra names "eval") and the earlier rounds' figures and counts from the previous checkpoint's card."""
    from models.classifier import model_name

    checkpoint_dir = Path(checkpoint_dir)
    prev = _previous_facts(checkpoint_dir, round_number)
    row = {"round": round_number, "eval": "central", **{k: extra[k] for k in (*FIGURES, "eval") if k in extra}}
    facts = CardFacts(
        base_model=model_name(settings.model), labels=list(settings.label_names()), mode=settings.mode,
        strategy=settings.strategy, strategy_options=dict(settings.strategy_options),
        aggregation=getattr(settings, "aggregation", None), rounds=round_number, rounds_planned=settings.rounds,
        version=version, rows=card_rows([*(prev.rows if prev else []), row]),
        examples_per_agent=dict(prev.examples_per_agent) if prev else {},
        model={"num_layers": settings.num_layers, "max_length": settings.max_length, "lora_r": settings.lora_r,
               "lora_alpha": settings.lora_alpha, "target_modules": _targets(settings)},
    )
    return write_model_card(checkpoint_dir, facts)


def _targets(settings) -> list[str]:
    """The LoRA target modules the model got (the spec's, or its family's defaults)."""
    from models.classifier import resolved_targets, spec_family

    spec = settings.classifier_spec()
    return list(resolved_targets(spec, spec_family(spec)))
