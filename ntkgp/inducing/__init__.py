"""Choosing inducing points among the training inputs."""

from ntkgp.inducing.selection import kmeans_points, pivoted_cholesky_points, random_points, select_inducing_points

__all__ = ["kmeans_points", "pivoted_cholesky_points", "random_points", "select_inducing_points"]
