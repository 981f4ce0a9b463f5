"""On-device learning and serving (federated mode with a state dir): the sample store, the HTTP
API, incremental runs between rounds, ONNX export and the checked swap of the served model.

Everything here runs on the agent's loop thread (edge_agent.runner), between rounds.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Callable

from edge_agent import incremental
from edge_agent.local_settings import CURRENT_FILE, MODELS_DIR, STORE_FILE, DeviceSetupError
from edge_agent.metrics import AgentMetrics
from edge_agent.settings import AgentSettings

log = logging.getLogger("edgetune.agent")


class _quiet_root_logger:
    """Drop records below ERROR logged on the root logger itself (not those of named loggers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    def __enter__(self):
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeFilter(self)


class Device:
    """The store, the served model and the local learning of one agent.

    `examples`: the agent's shard; `held_out`: its held-out slice for federated evaluation, which
    is also the local holdout that checks a model before it serves. Without one, a fixed slice of
    the shard becomes the local holdout (never trained on) and `self.examples` holds the rest,
    which the agent trains its rounds on. `labels` and `max_length` are the fleet's task's."""

    def __init__(self, s: AgentSettings, metrics: AgentMetrics, trainer, examples: list,
                 should_stop: Callable[[], bool], held_out: list | None = None, *, labels: list[str],
                 max_length: int) -> None:
        self.s, self.metrics, self.trainer, self.should_stop = s, metrics, trainer, should_stop
        self.labels, self.max_length = list(labels), max_length
        self.store = None
        self.slot = None
        self.http = None
        self.holdout_examples: list = list(held_out or [])
        self.examples = examples
        self.trainable_count = 0  # the store's labelled samples a round may train on (refreshed each second)
        self.model_dirty: str | None = None  # why the served model should be re-exported
        self._relearn = False  # a new global arrived: learn the stored samples on top of it
        self._incremental_run = 0
        self._next_store_check = 0.0

    def open(self) -> None:
        """Open the store, keep a local holdout, serve the last exported model, start the HTTP API."""
        from edge_agent.store import SampleStore, StoreError

        state = Path(self.s.state_dir).expanduser()
        try:
            state.mkdir(parents=True, exist_ok=True)
            self.store = SampleStore(state / STORE_FILE, self.s.store_max_samples, labels=self.labels,
                                     max_text_chars=self.s.store_max_text_chars)
        except StoreError as e:  # a store of another release that cannot be used as it is: it says what to do
            raise DeviceSetupError(str(e)) from None
        except (OSError, RuntimeError, sqlite3.Error) as e:
            raise DeviceSetupError(f"cannot open the sample store in {state} ({e}): check EDGETUNE_STATE_DIR "
                                   "(a writable local folder)") from None
        self.inc = incremental.IncrementalConfig.from_settings(self.s)
        # a fixed slice of the shard, never trained on: with the store's holdout samples it checks
        # each new model before it serves
        k = min(self.s.local_holdout, len(self.examples) // 5)
        if k and not self.holdout_examples:
            held = set(random.Random(self.s.partition_seed + 7).sample(range(len(self.examples)), k))
            self.holdout_examples = [e for i, e in enumerate(self.examples) if i in held]
            self.examples = [e for i, e in enumerate(self.examples) if i not in held]
        self._count_store()
        self._serve_last()
        if self.s.http_port is not None:
            self._start_http()

    def _count_store(self) -> None:
        """The store's figures: samples held, those a round may train on, and those whose label is
        not in the task's labels (kept, never trained on; the store logs them when it opens)."""
        self.metrics.samples_stored.set(self.store.count())
        self.metrics.samples_unknown_label.set(sum(self.store.unknown_labels().values()))
        self.trainable_count = incremental.trainable_count(self.store, self.inc)

    def _serve_last(self) -> None:
        from edge_agent.inference import ModelLoadError, ModelSlot, OnnxPredictor
        from edge_agent.local_settings import StateDirError

        threads = self.s.onnx_threads or None
        self.slot = ModelSlot(tolerance=self.s.swap_tolerance, loader=lambda d: OnnxPredictor(d, threads=threads))
        try:
            self.slot.install(self.s.current_model_dir())
            log.info("serving the exported model %s", self.slot.current_dir.name)
        except StateDirError:
            pass  # nothing exported yet: the first global adapter brings one
        except ModelLoadError as e:
            log.warning("the last exported model does not load (%s): the next global adapter replaces it", e)

    def _start_http(self) -> None:
        from edge_agent.http_api import make_server

        try:
            self.http = make_server(self.slot, self.store, port=self.s.http_port, metrics=self.metrics,
                                    max_text_chars=self.s.store_max_text_chars,
                                    record_inputs=self.s.http_record_inputs).start()
        except OSError as e:
            raise DeviceSetupError(f"the HTTP API cannot listen on 127.0.0.1:{self.s.http_port} ({e.strerror}): "
                                   "set EDGETUNE_HTTP_PORT to a free port (0: any), or unset it") from None
        log.info("HTTP API (predict, feedback) on %s", self.http.url)

    def close(self) -> None:
        if self.http is not None:
            self.http.stop()
        if self.store is not None:
            self.store.close()

    # -- rounds ---------------------------------------------------------------------------------
    def global_loaded(self, version: int) -> None:
        """A new global replaced the adapter: relearn the stored samples on it, then re-export."""
        self.model_dirty = f"global adapter v{version}"
        self._relearn = True

    def round_examples(self) -> tuple[list, list[int]]:
        """The shard plus the store's labelled samples (holdout excluded); ids of the new ones."""
        stored = incremental.trainable(self.store, self.inc)
        self.trainable_count = len(stored)
        return [*self.examples, *stored], [s.id for s in stored if not s.used_in_training]

    def mark_used(self, ids: list[int]) -> None:
        if ids:
            self.store.mark_used(ids)  # in this update: no incremental run needed for them

    # -- between rounds -------------------------------------------------------------------------
    def tick(self) -> None:
        """Between rounds, on the main loop thread: count samples, learn from new ones, re-export."""
        # learning starts from the fleet's model: not before the first global adapter
        learning = bool(self.inc.min_new) and self.trainer.global_version >= 0
        now = time.monotonic()
        if now >= self._next_store_check:
            self._next_store_check = now + 1.0
            self._count_store()
            if learning and not self._relearn and len(incremental.pending(self.store, self.inc)) >= self.inc.min_new:
                self._learn_incrementally()
        if self._relearn:
            # a new global replaced the adapter: learn the stored samples again on top of it, so
            # that the model served is the global plus what this device's users taught it
            self._relearn = False
            stored = incremental.trainable(self.store, self.inc) if learning else []
            if stored:
                self._learn_incrementally(stored)
        if self.model_dirty and self.s.onnx_export:
            self._refresh_model()

    def _learn_incrementally(self, samples: list | None = None) -> None:
        # no "training" status: that tells the aggregator an update is coming, and none is
        with self.metrics.local_train_seconds.time():
            r = incremental.fine_tune(self.trainer, self.store, self.examples, self.inc, run=self._incremental_run,
                                      should_stop=self.should_stop, new=samples)
        if r is None:
            return
        self._incremental_run += 1
        self.metrics.incremental_runs.inc()
        self.metrics.local_loss.set(r.mean_loss)
        log.info("incremental run: %d %s samples + %d replay, %d steps, loss %.4f, %.1fs", r.new_examples,
                 "new" if samples is None else "stored", r.replay_examples, r.steps, r.mean_loss, r.seconds)
        if r.completed:
            self.model_dirty = ("local learning" if samples is None
                                else f"{self.model_dirty} + local learning")

    def _holdout(self) -> tuple[list[str], list[int]]:
        rows = [*self.holdout_examples, *incremental.holdout(self.store, self.inc)]
        return [e.text for e in rows], [e.label for e in rows]

    # -- the served model -----------------------------------------------------------------------
    def _refresh_model(self) -> None:
        """Export the current model (ONNX, int8) into the state dir; serve it if it holds up on the holdout."""
        reason, self.model_dirty = self.model_dirty, None
        models = Path(self.s.state_dir).expanduser() / MODELS_DIR
        name = f"g{max(self.trainer.global_version, 0):05d}-l{self._incremental_run:04d}-{int(time.time() * 1000)}"
        t0 = time.perf_counter()
        final = self._export(models, name, reason)
        if final is None:
            return
        self._swap(final, reason, t0)
        keep = {p.name for p in (self.slot.current_dir, self.slot.previous_dir) if p is not None}
        for d in models.iterdir():
            if d.is_dir() and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)

    def _export(self, models: Path, name: str, reason: str) -> Path | None:
        """The int8 ONNX model in models/<name>, or None (logged and counted) if the export failed."""
        from models.onnx_export import export_onnx, quantize_int8

        tmp, final = models / (name + ".tmp"), models / name
        try:
            export_onnx(self.trainer.model, self.trainer.tokenizer, tmp, max_length=self.max_length,
                        adapter_version=self.trainer.global_version, labels=self.labels)
            with _quiet_root_logger():  # onnxruntime.quantization logs every tensor at INFO on the root logger
                quantize_int8(tmp / "model.onnx")
            (tmp / "model.onnx").unlink()  # the device serves int8; the fp32 graph is 4x its size
            meta = tmp / "model_meta.json"
            doc = json.loads(meta.read_text())
            doc["files"].pop("fp32", None)
            doc["local_runs"] = self._incremental_run
            meta.write_text(json.dumps(doc, indent=2))
            tmp.rename(final)
        except Exception as e:  # an export that fails must not stop the agent: the old model serves on
            log.error("ONNX export after %s failed (%s: %s): the model in service stays", reason, type(e).__name__, e)
            shutil.rmtree(tmp, ignore_errors=True)
            self.metrics.model_swaps.labels(outcome="export_failed").inc()
            return None
        return final

    def _swap(self, final: Path, reason: str, t0: float) -> None:
        """Serve the exported model if it holds up on the holdout (or if there is none to check)."""
        texts, labels = self._holdout()
        if texts:
            res = self.slot.swap(final, texts, labels)
            outcome, accepted = res.reason, res.accepted
            detail = (f"holdout accuracy {res.candidate_accuracy:.3f} vs {res.current_accuracy:.3f} "
                      if res.current_accuracy is not None and res.candidate_accuracy is not None else "")
            if res.candidate_accuracy is not None and accepted:
                self.metrics.holdout_accuracy.set(res.candidate_accuracy)
        else:  # no holdout at all (a tiny shard and no labelled samples): nothing to check against
            self.slot.install(final)
            outcome, accepted, detail = "unchecked", True, ""
        self.metrics.model_swaps.labels(outcome=outcome).inc()
        if accepted:
            pointer = final.parent / CURRENT_FILE
            pointer.with_suffix(".tmp").write_text(final.name + "\n")
            pointer.with_suffix(".tmp").replace(pointer)
            log.info("serving %s after %s (%s%s, %.1fs)", final.name, reason, outcome, ", " + detail if detail else "",
                     time.perf_counter() - t0)
        else:
            log.warning("kept the model in service after %s: the new one was refused (%s) %s", reason, outcome, detail)
