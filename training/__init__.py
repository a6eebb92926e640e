"""The training core FrozenTune's trainers share (UniTune, ControlNet-Zero, textual inversion).

It owns what every trainer around a frozen ComfyUI model needs, once:

- ``objective``      the diffusion target and loss in the model's own parameterization, timestep draws
- ``precision``      the precision policy: compute dtype, autocast, loss scaling, frozen twins that alias
                     the base's weights in their load dtype, fp32 master weights for what trains
- ``checkpointing``  gradient checkpointing that covers ComfyUI's UNet/ControlNet blocks, and its undo
- ``loop``           the step loop's progress/Cancel hook, non-finite-loss check and loss curve
- ``optimizers``     the optimizers a trainer may pick (AdamW, Adafactor, 8-bit AdamW)
- ``family``         model-family detection (one vocabulary) and the dtype-independent base fingerprint
- ``files``          atomic, durable safetensors I/O
- ``loss_curve``     the loss curve as a ComfyUI IMAGE
- ``preview``        previews while training: fixed-noise Euler at the current weights, RNG-forked, as a
                     ComfyUI progress-bar image, and their grid

Plain torch and ``comfy.*`` code: it never imports the node schema or the server, nor any capability
package. Nothing heavy is imported here.
"""
