"""The embedded small world: demo data and the recipes that train its tiny models."""
