"""Databricks job: the CDC apply at scale, with the same semantics as ``worker lake apply``.

Auto Loader (``cloudFiles``) picks up the stream parts that ``worker`` writes to
S3, and ``foreachBatch`` dedupes each micro-batch to the latest change per key
and MERGEs it into a Delta table. The merge predicate, the dedupe order and the
delete/update/insert conditions are imported from ``worker.cdc.cdc_rules``,
the module the local delta-rs apply uses, so the two cannot drift.

    python autoloader_cdc.py --source s3://lake/cdc/orders --target main.cdc.orders \\
        --checkpoint s3://lake/_checkpoints/orders [--processing-time "1 minute"]

Without ``--processing-time`` the job runs with ``availableNow`` (process what
is there, then stop): schedule it as a Databricks job. The ``worker`` wheel must
be installed on the cluster (``pip install worker`` from your artifact store).
"""

from __future__ import annotations

import argparse
from typing import Any

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F  # noqa: N812 - the PySpark convention
from pyspark.sql.types import ArrayType, MapType, StructType

from worker.cdc import cdc_rules as rules

APP_ID_PREFIX = "worker-cdc-autoloader"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Auto Loader CDC apply into a Delta table")
    parser.add_argument("--source", required=True, help="s3://BUCKET/PREFIX/TABLE of the parts")
    parser.add_argument("--target", required=True, help="a Unity Catalog table name")
    parser.add_argument("--checkpoint", required=True, help="checkpoint and schema location")
    parser.add_argument("--processing-time", default=None, help='e.g. "1 minute"')
    return parser.parse_args(argv)


def flatten(batch: DataFrame, key_columns: list[str]) -> DataFrame:
    """Envelopes -> one row per change: keys, image attributes, bookkeeping columns."""
    image_fields = [
        f.name for f in batch.schema["new_image"].dataType.fields if f.name not in key_columns
    ]  # type: ignore[union-attr]
    columns = [F.col(f"keys.`{k}`").alias(k) for k in key_columns]
    columns += [F.col(f"new_image.`{a}`").alias(a) for a in image_fields]
    columns += [
        F.lpad(F.col("sequence_number"), rules.SEQUENCE_WIDTH, "0").alias(rules.SEQUENCE_COLUMN),
        (F.col("approx_creation_time_ms") / 1000).cast("timestamp").alias(rules.EVENT_TIME_COLUMN),
        F.col("is_deleted").alias(rules.DELETE_COLUMN),
    ]
    flat = batch.select(*columns)
    nested = [
        f.name
        for f in flat.schema.fields
        if isinstance(f.dataType, StructType | ArrayType | MapType)
    ]
    for name in nested:  # the local apply stores nested values as JSON text too
        flat = flat.withColumn(name, F.to_json(F.col(name)))
    return flat


def latest_per_key(flat: DataFrame, key_columns: list[str]) -> DataFrame:
    """The dedupe rule: the highest sequence number per key wins."""
    order = F.col(rules.SEQUENCE_COLUMN).desc()
    window = Window.partitionBy(*key_columns).orderBy(order)
    return flat.withColumn("_rank", F.row_number().over(window)).where("_rank = 1").drop("_rank")


def make_upsert(spark: SparkSession, target: str, source: str) -> Any:
    app_id = f"{APP_ID_PREFIX}:{source}"

    def upsert(batch: DataFrame, batch_id: int) -> None:
        if batch.isEmpty():
            return
        key_columns = sorted(f.name for f in batch.schema["keys"].dataType.fields)  # type: ignore[union-attr]
        changes = latest_per_key(flatten(batch, key_columns), key_columns)
        columns = [c for c in changes.columns if c != rules.DELETE_COLUMN]
        if not spark.catalog.tableExists(target):
            changes.limit(0).drop(rules.DELETE_COLUMN).write.format("delta").saveAsTable(target)
        # Idempotent: a replayed micro-batch carries the same (app id, version).
        spark.conf.set("spark.databricks.delta.write.txnAppId", app_id)
        spark.conf.set("spark.databricks.delta.write.txnVersion", str(batch_id))
        spark.conf.set("spark.databricks.delta.schema.autoMerge.enabled", "true")
        assignments = {c: f"{rules.SOURCE_ALIAS}.`{c}`" for c in columns}
        (
            DeltaTable.forName(spark, target)
            .alias(rules.TARGET_ALIAS)
            .merge(changes.alias(rules.SOURCE_ALIAS), rules.merge_predicate(key_columns))
            .whenMatchedDelete(condition=rules.DELETE_WHEN)
            .whenMatchedUpdate(condition=rules.UPDATE_WHEN, set=assignments)
            .whenNotMatchedInsert(condition=rules.INSERT_WHEN, values=assignments)
            .execute()
        )

    return upsert


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spark = SparkSession.builder.getOrCreate()
    stream = (
        spark.readStream.format("cloudFiles")
        .option("cloudFiles.format", "json")  # the default NDJSON parts; images are structs
        .option("cloudFiles.schemaLocation", f"{args.checkpoint}/schema")
        .option("cloudFiles.inferColumnTypes", "true")
        .option("cloudFiles.schemaEvolutionMode", "addNewColumns")
        .load(args.source)
    )
    writer = stream.writeStream.foreachBatch(make_upsert(spark, args.target, args.source)).option(
        "checkpointLocation", f"{args.checkpoint}/stream"
    )
    if args.processing_time:
        writer = writer.trigger(processingTime=args.processing_time)
    else:
        writer = writer.trigger(availableNow=True)
    writer.start().awaitTermination()


if __name__ == "__main__":
    main()
