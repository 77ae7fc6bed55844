"""Recipes, plans and the pipeline that runs them."""
