"""Modelfiles and the model store."""
