"""Evaluators: the reward of a merged model and the per-task metrics behind its tax."""
