"""Prompt guidance and edit sampling around any model: the guider, and the SDEdit start, mask and blend-back helpers.

The guider declares its unconditional conds through the shared chunk protocol (``sampling.cond_chunks``).
Plain torch and ``comfy.*`` code; never imports the node schema or the server.
"""
