"""Stages of a command: train, evaluate, predict, and what they share."""
