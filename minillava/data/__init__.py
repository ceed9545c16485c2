"""Data: LLaVA's JSON format (`records`) and ShapesWorld, the synthetic world the book trains on."""

from .records import DataError, Record, load_records, save_records

__all__ = ["DataError", "Record", "load_records", "save_records"]
