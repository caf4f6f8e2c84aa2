"""What tests use on a machine: artifacts, datasets, S3 and ``gpu_cloud.instance()``.

May import: ``machine``, ``providers``, ``transport``, ``config``, ``core``, ``remote``.
"""
