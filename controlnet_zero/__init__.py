"""ControlNet-Zero: train a ControlNet (zero-initialized outputs around a frozen base model).

The network is ComfyUI's own ControlNet class for the base's family, built from the base model's
detected configuration (``layouts``: SD1.x/SDXL ``comfy.cldm.cldm.ControlNet`` in the ldm layout,
Flux.1 ``ControlNetFlux`` in XLabs' layout, SD3 ``comfy.cldm.mmdit.ControlNet`` in diffusers' layout), so
the stock ``ControlNetLoader`` / ``ControlNetApplyAdvanced`` nodes use the saved file as is. The same training loop
runs inside a ComfyUI node and from the command line (``python -m controlnet_zero.train``, also
under ``torchrun`` with DistributedDataParallel).

Nothing heavy is imported here.
"""
