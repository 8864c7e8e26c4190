"""The names of the pipeline's timed stages: the keys of GroundingResult.timings and of the node's per-stage
latency, and the stages its action reports as feedback. One source: tests check the code and the message
comments against these tuples."""

# Once per camera frame. The pipeline runs "lmm_prefix" (the LMM over the image tokens) inside the frame's first
# pass (pipeline.encode defers it), so it is timed only where an adapter runs it alone.
ENCODE_STAGES = ("vision", "lmm_prefix", "sam_encoder")
# In instruction mode, in this order: the masks first, then the spoken answer (reasoning mode answers first).
INSTRUCTION_STAGES = ("phrases", "phrase_pass", "mask_head", "sam_decoder", "post", "answer")
PIPELINE_STAGES = ENCODE_STAGES + INSTRUCTION_STAGES
# The tracker's per-frame stages (grounding/tracking.py): no LMM, except "reground" for a lost object.
TRACKING_STAGES = ("sam_encoder", "motion", "sam_decoder", "post", "reground")
