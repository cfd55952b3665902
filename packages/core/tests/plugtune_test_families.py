"""A test-only plugin: routes real decoder model types to core's generic defaults.

Core's tests run in a venv without any family plugin (``nox -s core``); this module, loaded
through ``PLUGTUNE_LOAD_PLUGINS`` by ``conftest.py``, lets them use real checkpoints such as
stories260K (``model_type: llama``) while proving the core path works with no plugin at all.
Installed plugins are not loaded while it is in effect, so results do not depend on them.
"""

from plugtune import hookimpl
from plugtune.spec import Family


@hookimpl
def plugtune_families():
    return [Family("core-test-decoders", ("llama", "mistral", "qwen2"), "causal",
                   "core tests only: served by plugtune.default_plugins.causal_lm")]
