"""Deployment side of spae: the local stack (SeaweedFS S3 + MLflow), container image, cluster manifests."""
