"""What tests use on a machine: artifacts, datasets, S3, ``gpu_cloud.instance()``,
``gpu_service`` (a server deployed on an instance) and the coverage of remote tests (``--cov``).

May import: ``machine``, ``providers``, ``transport``, ``config``, ``core``, ``remote``.
"""
