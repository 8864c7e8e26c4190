"""Training and evaluation of the grounding head (mask head + text projection + SAM prompt/decoder)
on top of any frozen LMM adapter, F-LMM's recipe: `python -m flmm_ros.grounding.training.train`,
`python -m flmm_ros.grounding.training.evaluate`."""
