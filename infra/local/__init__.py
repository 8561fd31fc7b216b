"""A real local stack on loopback: SeaweedFS S3 and an MLflow tracking server (see ``stack.py``)."""
