"""Recipes (typed, validated YAML sections) and Settings (recipe + command line resolved once, stored whole in the manifest)."""
