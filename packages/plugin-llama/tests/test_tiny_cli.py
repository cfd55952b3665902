"""``python -m plugtune_llama.tiny`` (README quick start) works on a plain install: pytest is
only in the test extra, so neither it nor ``plugtune.testing`` may need pytest to import."""

from __future__ import annotations

import subprocess
import sys

# an import hook that makes ``import pytest`` fail, as on an install without the test extra
_NO_PYTEST = (
    "import sys\n"
    "class _Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'pytest' or name.startswith(('pytest.', '_pytest')):\n"
    "            raise ImportError('No module named ' + repr(name))\n"
    "sys.meta_path.insert(0, _Block())\n"
    "import plugtune.testing, plugtune_llama.tiny\n"
    "print('imported')\n"
)


def test_tiny_cli_runs_without_pytest():
    proc = subprocess.run([sys.executable, "-c", _NO_PYTEST], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "imported" in proc.stdout
