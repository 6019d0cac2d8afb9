"""The loader: SQS message -> S3 ``OutputFile`` -> ``{table: [rows]}`` -> DynamoDB.

``messages`` parses bodies, ``s3_reader`` downloads within caps, ``extract``
decodes and runs the pluggable ``TableExtract``, ``items`` converts rows,
``tables`` finds or creates tables, ``writer`` and ``ddb_http`` write them,
``pipeline`` runs one object end to end, ``batch`` turns messages into outcomes
(the Lambda SQS route), ``poller`` and ``supervisor`` run it on ECS.
"""
