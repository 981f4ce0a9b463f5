"""Where a process's data comes from (EDGETUNE_DATA, --data; the aggregator's EDGETUNE_EVAL_DATA):
settings shared by the commands that load data through data/sources.py."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ColumnSettings(BaseModel):
    """How a data file's rows are read (data.sources.load_source's options)."""

    text_column: str = Field("text", min_length=1, description="the column (or JSON field) that holds the text")
    label_column: str = Field("label", min_length=1, description="the column (or JSON field) that holds the label name")
    domain_column: str = Field("domain", min_length=1, description="the column that gives a row's domain (the "
                               "by-domain partition splits by it); rows without one take their file's name")
    max_bad_rows: int = Field(0, ge=0, description="skip up to N bad rows of the data, each logged with its line "
                              "(0: refuse the data at its first bad row)")

    def load_options(self) -> dict:
        """The keyword arguments of data.sources.load_source that these settings give."""
        return dict(text_column=self.text_column, label_column=self.label_column, max_bad_rows=self.max_bad_rows,
                    domain_column=self.domain_column)


class DataSettings(ColumnSettings):
    """An agent's (or a command's) own data."""

    data: str | None = Field(None, description="a CSV, JSONL or Parquet file (plain .txt too in split mode), a "
                             "folder of them, or a shipped demo by name (demo:vader, demo:brown); unset: none")
    eval_fraction: float = Field(0.2, ge=0, lt=1, description="the share of an agent's data held out for federated "
                                 "evaluation (never trained on; the same rows on every run); 0: none")
    eval_max_examples: int = Field(256, ge=0, description="hold out at most this many (the first of the slice); the "
                                   "rest of the slice trains, so a large shard does not pay for a large evaluation "
                                   "every round (0: no cap)")
