"""UniTune: single-image fine-tuning of a disposable model copy, and prompt-guided edit sampling.

Plain torch and ``comfy.*`` code; never imports the node schema or the server.
"""
