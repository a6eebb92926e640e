"""InstantStyle: IP-Adapter image features, minus the content's text embedding, in chosen blocks only.

Plain torch and ``comfy.*`` code; never imports the node schema or the server.
"""
