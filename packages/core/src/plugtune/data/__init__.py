"""The instruction data pipeline: formats, templates, tokenization + label masking, packing."""

from plugtune.data.collate import Collator
from plugtune.data.loading import DataError
from plugtune.data.packing import best_fit_decreasing, pack_rows
from plugtune.data.pipeline import PreparedData, prepare
from plugtune.data.tokenize import IGNORE_INDEX, TemplateInfo, probe_template

__all__ = ["Collator", "DataError", "IGNORE_INDEX", "PreparedData", "TemplateInfo",
           "best_fit_decreasing", "pack_rows", "prepare", "probe_template"]
