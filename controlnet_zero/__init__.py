"""ControlNet-Zero: a trainable encoder copy joined by zero-initialized convs around a frozen base.

Plain torch and ``comfy.*`` code; never imports the node schema or the server.
"""
