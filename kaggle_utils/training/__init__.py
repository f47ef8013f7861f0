"""The train stage's loop in parts (``kaggle_utils.train`` is the recipe that puts them together).

config (TrainConfig) · rows (split, targets, weights, encoding) · schedule (micro-batches, steps, learning rate) ·
precision (autocast, loss scaling, fp32 trainable weights) · run (a run's state) · step (forward, loss, backward,
update) · memory (the ``batch_tokens = 0`` probe) · evaluation (validation, best-keeping) · checkpoints (resume) ·
outputs (adapter, predictions, metrics) · parallel (DDP / FSDP processes under ``accelerate launch``) · errors.
"""
