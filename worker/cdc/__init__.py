"""The CDC lake: DynamoDB Streams -> S3 parts -> Delta Lake.

``images`` turns stream images into JSON-ready values; ``buffer`` wraps each
change in an envelope, groups changes by table and event hour, and writes
content-addressed part files exactly once; ``lake`` MERGEs the parts into a
Delta table with the rules in ``cdc_rules``, which the Databricks job shares.
"""
