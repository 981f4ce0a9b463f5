"""Where a process's data comes from (EDGETUNE_DATA, --data): settings shared by the commands
that load data through data/sources.py."""

from __future__ import annotations

from pydantic import BaseModel, Field


class DataSettings(BaseModel):
    data: str | None = Field(None, description="a CSV, JSONL or Parquet file (plain .txt too in split mode), a "
                             "folder of them, or a shipped demo by name (demo:vader, demo:brown); unset: none")
    text_column: str = Field("text", min_length=1, description="the column (or JSON field) that holds the text")
    label_column: str = Field("label", min_length=1, description="the column (or JSON field) that holds the label name")
    max_bad_rows: int = Field(0, ge=0, description="skip up to N bad rows of the data, each logged with its line "
                              "(0: refuse the data at its first bad row)")

    def load_options(self) -> dict:
        """The keyword arguments of data.sources.load_source that these settings give."""
        return dict(text_column=self.text_column, label_column=self.label_column, max_bad_rows=self.max_bad_rows)
