"""Getting a run out of plugtune: portable run folders, GGUF in and out, Ollama.

``portable``: what a run folder needs to load anywhere (absolute base paths, generation config,
base recorded in ``plugtune_base.json``). ``gguf``: a ``.gguf`` base de-quantized once into a
cached safetensors folder, and ``plugtune export`` (merged folder + GGUF through llama.cpp's
converter + Ollama ``Modelfile``). Merging itself lives in :mod:`plugtune.merge`.
"""
