"""Whetstone trainer: data, models, training methods, checkpoints and the training service."""
