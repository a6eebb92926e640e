"""The training core FrozenTune's trainers share (UniTune, ControlNet-Zero, textual inversion).

It owns what every trainer around a frozen ComfyUI model needs, once:

- ``objective``      the diffusion target and loss in the model's own parameterization, timestep draws
- ``precision``      the precision policy: compute dtype, autocast, loss scaling, frozen twins that alias
                     the base's weights in their load dtype, fp32 master weights for what trains
- ``checkpointing``  gradient checkpointing that covers ComfyUI's UNet/ControlNet blocks, and its undo
- ``lean_norm``      LayerNorms that keep their output, not their input, for backward (a copy fewer in place)
- ``loop``           the step loop's progress/Cancel hook, non-finite-loss check and loss curve
- ``optimizers``     the optimizers a trainer may pick (AdamW, Adafactor, 8-bit AdamW)
- ``loss_curve``     the loss curve as a ComfyUI IMAGE
- ``conditioning``   the prompt conditioning a trainer feeds the model, as a sampler would
- ``image_folder``   a folder of training images read as the stock Load Image node reads them
- ``preview``        previews while training: fixed-noise Euler at the current weights, RNG-forked, as a
                     ComfyUI progress-bar image, and their grid

Plain torch and ``comfy.*`` code: it imports only the shared ``storage`` and ``families`` packages, never
the node schema, the server or a capability. Nothing heavy is imported here.
"""
