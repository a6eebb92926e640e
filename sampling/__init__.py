"""What sampling-time code shares across capabilities: the chunk protocol (``cond_chunks``) by which a guider
declares which of its batched conds are unconditional, so attention patches (InstantStyle) treat them right.

Plain torch and ``comfy.*`` code; never imports the node schema, the server or a capability.
"""
