"""How good predictions are, shared by every stage that scores: metrics (accuracy, log loss, swap consistency, per
language) and calibration (a temperature per model, the blend weight of two), fitted on held-out predictions."""
