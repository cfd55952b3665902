"""The families this plugin declares: model types that exist in transformers, and every test id
``plugtune families`` shows for them names a test function in this folder."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from transformers import CONFIG_MAPPING

from plugtune_gemma.plugin import FAMILIES

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]  # the repository: test ids are relative to it


def _functions(path: Path) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_family_model_types_exist_and_tests_are_real(fam):
    assert all(mt in CONFIG_MAPPING for mt in fam.model_types)
    assert fam.quirks and fam.tests and fam.packing == "exact"
    for test_id in fam.tests:
        path, _, name = test_id.partition("::")
        assert (ROOT / path).is_file(), test_id
        assert name in _functions(ROOT / path), test_id
