"""Prompt guidance and edit sampling around any model: the guider, the SDEdit start and blend-back helpers,
and the chunk protocol that tells attention patches which batched conds are unconditional.

Plain torch and ``comfy.*`` code; never imports the node schema or the server.
"""
