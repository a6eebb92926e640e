"""Textual inversion: learn a new word's vectors on a frozen model and text encoder.

The file is the stock embedding layout, so ``embedding:<name>`` in any prompt reads it. Pivotal
UniTune uses this package's public API (``word_trainer``, ``embedding_file``). Plain torch and
``comfy.*`` code; never imports the node schema or the server.
"""
