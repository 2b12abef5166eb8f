"""The run pipeline: recipes, the resumable runner that chains the stages, model cards, publishing."""
