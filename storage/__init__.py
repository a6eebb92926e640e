"""Where FrozenTune reads and writes files, and how: the name and path policy and atomic safetensors I/O.

- ``names``             output names: one plain name or subfolder/name inside a ComfyUI model folder
- ``user_paths``        user-given data folders, confined to ComfyUI's input folder and FROZENTUNE_DATA_DIRS
- ``safetensors_file``  atomic, durable safetensors writes and reads with clear errors

Standard library and torch only (no ``comfy.*``), so the torchrun CLI and unit tests import it too.
"""
