"""Datasets shipped with the project and the partitioners that split them across agents."""
