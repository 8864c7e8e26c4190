"""The names of the pipeline's timed stages: the keys of GroundingResult.timings and of the node's per-stage
latency, and the stages its action reports as feedback. One source: tests check the code and the message
comments against these tuples."""

ENCODE_STAGES = ("vision", "lmm_prefix", "sam_encoder")          # once per camera frame
# In instruction mode, in this order: the masks first, then the spoken answer (reasoning mode answers first).
INSTRUCTION_STAGES = ("phrases", "phrase_pass", "mask_head", "sam_decoder", "post", "answer")
PIPELINE_STAGES = ENCODE_STAGES + INSTRUCTION_STAGES
# The tracker's per-frame stages (grounding/tracking.py): no LMM, except "reground" for a lost object.
TRACKING_STAGES = ("sam_encoder", "motion", "sam_decoder", "post", "reground")
