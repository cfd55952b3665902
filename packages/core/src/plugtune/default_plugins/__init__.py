"""Plugins that ship with core: generic ``trylast`` fallbacks for any causal LM."""
