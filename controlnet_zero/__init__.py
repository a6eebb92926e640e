"""ControlNet-Zero: train a ControlNet (zero-initialized convs around a frozen base UNet).

The network is ComfyUI's own ``comfy.cldm.cldm.ControlNet`` built from the base model's detected
UNet configuration, so the saved file is in ComfyUI's ldm ControlNet layout and the stock
``ControlNetLoader`` / ``ControlNetApplyAdvanced`` nodes use it as is. The same training loop
runs inside a ComfyUI node and from the command line (``python -m controlnet_zero.train``, also
under ``torchrun`` with DistributedDataParallel).

Nothing heavy is imported here.
"""
