"""What tests use on a machine: artifacts, datasets, S3, ``gpu_cloud.instance()`` and
``gpu_service`` (a server deployed on an instance).

May import: ``machine``, ``providers``, ``transport``, ``config``, ``core``, ``remote``.
"""
