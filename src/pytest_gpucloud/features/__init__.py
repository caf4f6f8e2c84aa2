"""What tests use on an instance: artifacts, datasets, S3, ``gpu_cloud.instance()``."""
