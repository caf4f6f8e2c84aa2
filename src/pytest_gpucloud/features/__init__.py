"""What tests get beyond running remotely: artifacts, datasets, S3, instances of their own, and
coverage."""
