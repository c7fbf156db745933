"""Gradient-level methods: each reads the per-task gradients of the shared part."""
