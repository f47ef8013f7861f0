"""The parts of the inference stage (``kaggle_utils.infer``) that are not its recipe: the cascade's roles (a model's
files, token ids and device copies), the blend of their probabilities into predictions, the files the stage writes
and its report. Below the stages, above ``scoring``.
"""
