"""What each step of inference costs and spends: the FLOPs and bytes model of a step
(``cost_model``) and a per-step, per-request trace of real runs (``trace``)."""
