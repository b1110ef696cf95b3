"""Strict: the pydantic base of every configuration section and of the records mogvae
reads back from its folders. Unknown keys are refused, numbers must be finite, and a
boolean is never read as a number."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, data):
        """pydantic's lax mode reads `true` as 1; a number field given a boolean is a mistake."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if field is not None and isinstance(value, bool) and field.annotation in (int, float):
                    raise ValueError(f"{name}: expected a number, got {str(value).lower()}")
        return data
