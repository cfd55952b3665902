"""plugtune plugin for OpenAI's gpt-oss. Hook implementations live in :mod:`plugtune_gpt_oss.plugin`."""

__version__ = "0.1.0"
