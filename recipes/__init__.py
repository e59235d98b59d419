"""Runnable recipes: one module per recipe, each readable top to bottom and defining ``RECIPE``."""
