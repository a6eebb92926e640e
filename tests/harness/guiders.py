"""The Prompt Guidance Guider and stock CFGGuider built the way the guidance tests compare them.

``p`` is a dict of CONDITIONINGs with keys ``positive``, ``negative``, ``baseline``.
"""

from __future__ import annotations


def ours(model, p, cfg, pg, **kw):
    """The Prompt Guidance Guider node's GUIDER, pg over the whole schedule and no rescale unless ``kw`` says."""
    from frozentune.nodes.guidance_nodes import PromptGuidanceGuider

    args = dict(pg_start=0.0, pg_end=1.0, rescale=0.0)
    args.update(kw)
    return PromptGuidanceGuider.execute(model=model, positive=p["positive"], baseline=p["baseline"],
                                        negative=p["negative"], cfg=cfg, pg=pg, **args).args[0]


def stock_cfg(model, p, cfg):
    """Stock CFGGuider on the same positive and negative."""
    from comfy_extras.nodes_custom_sampler import CFGGuider

    return CFGGuider.execute(model, p["positive"], p["negative"], cfg).args[0]
