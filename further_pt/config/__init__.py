"""Recipes: the typed schema of every key, composing a recipe with its overrides, the checks
a run makes before any work, and the key comments the reference page is made of.

The bottom of the pipeline: every stage reads its settings from a composed recipe, and no
module here imports a stage.
"""
