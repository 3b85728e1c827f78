"""Analyses of what a backbone's layers do to its inductive bias (above backbones, beside the engine)."""
