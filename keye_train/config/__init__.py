"""Typed config schemas, their registration with Hydra, and validation."""
