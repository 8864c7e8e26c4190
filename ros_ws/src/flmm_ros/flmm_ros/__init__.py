"""flmm_ros: language grounding for ROS 2 robots (F-LMM: frozen LMM attention -> masks)."""
