"""The one-machine run on the user's own data: `edgetune run --data / --agent-data / --eval-data
/ --labels / --partition by:COLUMN` checked and resolved before anything starts.

Every source is loaded once here with the task's labels, so a bad file stops the run with the
file, line and what to do (data.records.DataError, exit 2) before a broker, aggregator or agent
starts; the agents load their own share again in their own processes.
"""

from __future__ import annotations

import glob as globbing
from pathlib import Path

from data.partition import PARTITIONERS
from data.records import DataError
from data.sources import is_demo, load_source
from edgetune.runner import RunOptions, demo_data

BY_COLUMN = "by:"


class RunDataError(ValueError):
    """A run option about data that cannot work (the message says what to do)."""


def parse_partition(partition: str) -> tuple[str, str]:
    """(partitioner, domain column): `by:COLUMN` splits by a column's values (one value per agent)."""
    if partition.startswith(BY_COLUMN):
        column = partition[len(BY_COLUMN):].strip()
        if not column:
            raise RunDataError("--partition by:COLUMN needs a column name, e.g. by:genre")
        return "by-domain", column
    if partition not in PARTITIONERS:
        raise RunDataError(f"--partition {partition!r}: choose one of {', '.join(PARTITIONERS)} or by:COLUMN")
    return partition, ""


def agent_files(pattern: str) -> list[str]:
    files = sorted(p for p in globbing.glob(str(Path(pattern).expanduser())) if Path(p).is_file())
    if not files:
        raise RunDataError(f"--agent-data {pattern!r} matches no file: give a glob such as 'shards/*.csv' (quoted)")
    return files


def resolve(opts: RunOptions, *, agent_data: str = "", labels: str = "", partition: str = "by-domain",
            columns: dict | None = None) -> RunOptions:
    """Fill `opts` (data, agent files, labels, partition, eval data) for the run; raises DataError or
    RunDataError. Without --data / --agent-data the run is the mode's demo, as before."""
    columns = columns or {}
    opts.partition, opts.domain_column = parse_partition(partition)
    if opts.domain_column:
        columns = {**columns, "domain_column": opts.domain_column}
    if agent_data:
        if opts.data:
            raise RunDataError("give either --data (split across the agents) or --agent-data (a file per agent)")
        opts.agent_data = agent_files(agent_data)
        opts.agents = len(opts.agent_data)
    sources = opts.agent_data or [opts.data or demo_data(opts.mode)]
    if opts.mode == "split":
        for src in sources:
            load_source(src, text_only=True, **_file_options(src, columns))
        return opts
    names = [x.strip() for x in labels.split(",") if x.strip()] if labels else None
    if names is None:  # read from the data: the union of the sources' label names, sorted
        found: set[str] = set()
        for src in sources:
            found.update(load_source(src, **_file_options(src, columns)).labels)
        names = sorted(found, key=int) if all(x.isdigit() for x in found) else sorted(found)
    if len(names) < 2:
        raise RunDataError(f"the data names {len(names)} label ({', '.join(names)}): a classifier needs at least 2; "
                           "give --labels a,b,... or data with more classes")
    for src in sources:  # every row's label must be one of them: checked now, not in an agent
        load_source(src, labels=names, **_file_options(src, columns))
    if opts.eval_data:
        load_source(opts.eval_data, labels=names, split="test" if is_demo(opts.eval_data) else None,
                    **_file_options(opts.eval_data, columns))
    opts.labels = names
    return opts


def _file_options(src: str, columns: dict) -> dict:
    return {} if is_demo(src) else columns


__all__ = ["DataError", "RunDataError", "resolve", "parse_partition", "agent_files"]
