"""Training: the run/resume pipeline (run), the loop (train), accelerate set-up and tracking (accelerator), checkpoints, process groups."""
