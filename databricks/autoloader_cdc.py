"""Databricks job: the CDC apply at scale, with the same semantics as ``worker lake apply``.

Auto Loader (``cloudFiles``) picks up the stream parts that ``worker`` writes to
S3 (NDJSON, or Parquet with ``--format parquet``), and ``foreachBatch`` dedupes
each micro-batch to the latest change per key, drops the changes a tombstone
refuses, MERGEs the deletes into the tombstone table and then the changes into
the target. Every condition, the column naming and the dedupe order come from
``worker.cdc.cdc_rules``, the module the local delta-rs apply uses, so the two
cannot drift.

    python autoloader_cdc.py --source s3://lake/cdc/orders --target main.cdc.orders \\
        --checkpoint s3://lake/_checkpoints/orders [--format parquet] \\
        [--processing-time "1 minute"]
    python autoloader_cdc.py --target main.cdc.orders --maintain   # a daily task
    python autoloader_cdc.py --target main.cdc.orders --keys id \
        --bootstrap s3://lake/exports/AWSDynamoDB/EXPORT_ID       # once, before the stream

Without ``--processing-time`` the job runs with ``availableNow`` (process what
is there, then stop): schedule it as a Databricks job. Tombstones live in
``{target}_cdc_tombstones``; readers of the target need not know about them.
Progress is Auto Loader's own checkpoint, which Delta's log cleanup never
touches. The ``worker`` wheel must be installed on the cluster.

``--bootstrap`` loads a DynamoDB full export (``DYNAMODB_JSON``) into a new
target, items converted by ``worker.cdc.images`` and named by
``rules.column_names`` as the stream's are, with sequence number 0, and
records the export's time in ``{target}_cdc_cutover``; the stream job then
drops every change recorded before the export's second (``rules.AFTER_CUTOVER``,
the rule ``worker lake apply`` uses).

``--format incremental-export`` reads DynamoDB incremental exports instead of
stream parts (``--source`` is the prefix holding ``AWSDynamoDB/EXPORT_ID/``):
each line becomes the stream's envelope by ``worker.cdc.exports``, its write
time the sequence number. Keep one table on one kind of source: the job does
not check, ``worker lake apply`` refuses a mix.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import Any

import orjson
from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F  # noqa: N812 - the PySpark convention
from pyspark.sql.types import ArrayType, MapType, StructType

from worker.cdc import cdc_rules as rules
from worker.cdc.exports import change_envelope
from worker.cdc.images import convert_image

APP_ID_PREFIX = "worker-cdc-autoloader"
JSON_COLUMNS = ("keys", "new_image")  # JSON text in Parquet parts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Auto Loader CDC apply into a Delta table")
    parser.add_argument("--source", help="s3://BUCKET/PREFIX/TABLE of the parts")
    parser.add_argument("--target", required=True, help="a Unity Catalog table name")
    parser.add_argument("--checkpoint", help="checkpoint and schema location")
    parser.add_argument(
        "--format",
        choices=["json", "parquet", "incremental-export"],
        default="json",
        help="the parts' (json, parquet), or DynamoDB incremental exports' data files",
    )
    parser.add_argument("--processing-time", default=None, help='e.g. "1 minute"')
    parser.add_argument("--maintain", action="store_true", help="expire, optimize, vacuum")
    parser.add_argument("--bootstrap", help="s3://.../AWSDynamoDB/EXPORT_ID: a full export")
    parser.add_argument("--keys", help="the key attributes, comma-separated (with --bootstrap)")
    parser.add_argument(
        "--tombstone-retention-hours", type=int, default=rules.TOMBSTONE_RETENTION_HOURS
    )
    args = parser.parse_args(argv)
    if args.bootstrap and not args.keys:
        parser.error("--bootstrap needs --keys")
    if not (args.maintain or args.bootstrap) and not (args.source and args.checkpoint):
        parser.error("--source and --checkpoint are required unless --maintain or --bootstrap")
    return args


def tombstone_table(target: str) -> str:
    return f"{target}_cdc_tombstones"


def cutover_table(target: str) -> str:
    return f"{target}_cdc_cutover"


def bootstrap(spark: SparkSession, export: str, target: str, keys: list[str]) -> None:
    """A full export into a new target, and the export's time as its cut-over."""
    export = export.rstrip("/")
    summary = orjson.loads(spark.sparkContext.wholeTextFiles(f"{export}/manifest-summary.json")
                           .first()[1])  # fmt: skip
    if summary.get("exportType", "FULL_EXPORT") != "FULL_EXPORT":
        raise SystemExit(f"{export} is not a full export")
    bucket = export[: export.index("/", len("s3://"))]
    listing = spark.read.json(f"{bucket}/{summary['manifestFilesS3Key']}")
    paths = [f"{bucket}/{row.dataFileS3Key}" for row in listing.select("dataFileS3Key").collect()]
    export_ms = int(datetime.fromisoformat(summary["exportTime"].replace("Z", "+00:00"))
                    .timestamp() * 1000)  # fmt: skip
    convert = F.udf(lambda line: orjson.dumps(convert_image(orjson.loads(line)["Item"])).decode())
    images = spark.read.text(paths).select(convert("value").alias("new_image"))
    schema = spark.read.json(images.rdd.map(lambda row: row[0])).schema
    envelopes = images.select(F.from_json("new_image", schema).alias("new_image"))
    envelopes = envelopes.select(
        F.struct(*[F.col(f"new_image.`{k}`").alias(k) for k in keys]).alias("keys"),
        "new_image",
        F.lit("0").alias("sequence_number"),
        F.lit(export_ms).alias("approx_creation_time_ms"),
        F.lit(False).alias("is_deleted"),
    )
    flat, _ = flatten(envelopes, [])
    flat.drop(rules.DELETE_COLUMN).write.format("delta").mode("errorifexists").saveAsTable(target)
    spark.createDataFrame(
        [(summary["exportArn"], export_ms)], "export_arn string, export_time_ms long"
    ).write.format("delta").mode("append").saveAsTable(cutover_table(target))


def after_cutover(spark: SparkSession, flat: DataFrame, target: str) -> DataFrame:
    """The changes a bootstrap's export may not hold (none dropped without one)."""
    if not spark.catalog.tableExists(cutover_table(target)):
        return flat
    cutover_ms = spark.table(cutover_table(target)).agg(F.max("export_time_ms")).first()[0]
    keep = rules.AFTER_CUTOVER.format(cutover=f"timestamp_millis({int(cutover_ms)})")
    return flat.alias(rules.SOURCE_ALIAS).where(keep).select(f"{rules.SOURCE_ALIAS}.*")


def parse_exports(spark: SparkSession, batch: DataFrame) -> DataFrame:
    """Incremental export lines (DynamoDB JSON) -> the stream's envelopes, by the
    same function ``lake apply --source-format incremental-export`` uses."""
    to_envelope = F.udf(lambda line: orjson.dumps(change_envelope(line, "")).decode())
    envelopes = batch.select(to_envelope("value").alias("envelope"))
    schema = spark.read.json(envelopes.rdd.map(lambda row: row[0])).schema
    return envelopes.select(F.from_json("envelope", schema).alias("e")).select("e.*")


def parse_images(spark: SparkSession, batch: DataFrame) -> DataFrame:
    """Parquet parts keep images as JSON text: infer their schema and parse them."""
    for name in JSON_COLUMNS:
        texts = batch.select(name).where(F.col(name).isNotNull()).rdd.map(lambda row: row[0])
        schema = spark.read.json(texts).schema
        batch = batch.withColumn(name, F.from_json(F.col(name), schema))
    return batch


def flatten(batch: DataFrame, existing: list[str]) -> tuple[DataFrame, list[str]]:
    """Envelopes -> one row per change: keys, image attributes, bookkeeping columns;
    attribute names become columns by ``rules.column_names``. Returns the key columns."""
    keys = [f.name for f in batch.schema["keys"].dataType.fields]  # type: ignore[union-attr]
    image = [f.name for f in batch.schema["new_image"].dataType.fields]  # type: ignore[union-attr]
    names = rules.column_names([*keys, *image], existing)
    columns = [F.col(f"keys.`{k}`").alias(names[k]) for k in keys]
    columns += [F.col(f"new_image.`{a}`").alias(names[a]) for a in image if a not in keys]
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
    return flat, sorted(names[k] for k in keys)


def latest_per_key(flat: DataFrame, key_columns: list[str]) -> DataFrame:
    """The dedupe rule: the highest sequence number per key wins."""
    window = Window.partitionBy(*key_columns).orderBy(F.col(rules.SEQUENCE_COLUMN).desc())
    return flat.withColumn("_rank", F.row_number().over(window)).where("_rank = 1").drop("_rank")


def not_tombstoned(
    spark: SparkSession, changes: DataFrame, tombstones: str, keys: list[str]
) -> DataFrame:
    """Drop the changes no newer than their key's tombstone."""
    if not spark.catalog.tableExists(tombstones):
        return changes
    on = F.expr(rules.merge_predicate(keys, target=rules.TOMBSTONE_ALIAS))
    joined = changes.alias(rules.SOURCE_ALIAS).join(
        spark.table(tombstones).alias(rules.TOMBSTONE_ALIAS), on, "left"
    )
    return joined.where(rules.NOT_TOMBSTONED).select(f"{rules.SOURCE_ALIAS}.*")


def merge_tombstones(
    spark: SparkSession, changes: DataFrame, tombstones: str, keys: list[str]
) -> None:
    """A newer delete moves or adds the key's tombstone; a newer change clears it."""
    columns = [*keys, rules.SEQUENCE_COLUMN, rules.EVENT_TIME_COLUMN]
    source = changes.select(*columns, rules.DELETE_COLUMN)
    if not spark.catalog.tableExists(tombstones):
        source.limit(0).drop(rules.DELETE_COLUMN).write.format("delta").saveAsTable(tombstones)
    assignments = {c: f"{rules.SOURCE_ALIAS}.`{c}`" for c in columns}
    (
        DeltaTable.forName(spark, tombstones)
        .alias(rules.TARGET_ALIAS)
        .merge(source.alias(rules.SOURCE_ALIAS), rules.merge_predicate(keys))
        .whenMatchedUpdate(condition=rules.TOMBSTONE_MOVE_WHEN, set=assignments)
        .whenMatchedDelete(condition=rules.TOMBSTONE_CLEAR_WHEN)
        .whenNotMatchedInsert(condition=rules.TOMBSTONE_ADD_WHEN, values=assignments)
        .execute()
    )


def make_upsert(spark: SparkSession, target: str, source: str, fmt: str) -> Any:
    app_id = f"{APP_ID_PREFIX}:{source}"
    tombstones = tombstone_table(target)

    def upsert(batch: DataFrame, batch_id: int) -> None:
        if batch.isEmpty():
            return
        if fmt == "parquet":
            batch = parse_images(spark, batch)
        elif fmt == "incremental-export":
            batch = parse_exports(spark, batch)
        existing = spark.table(target).columns if spark.catalog.tableExists(target) else []
        flat, keys = flatten(batch, existing)
        flat = after_cutover(spark, flat, target)
        changes = not_tombstoned(spark, latest_per_key(flat, keys), tombstones, keys).persist()
        columns = [c for c in changes.columns if c != rules.DELETE_COLUMN]
        if not spark.catalog.tableExists(target):
            changes.limit(0).drop(rules.DELETE_COLUMN).write.format("delta").saveAsTable(target)
        # Idempotent: a replayed micro-batch carries the same (app id, version), on both
        # tables; tombstones are merged first, as the local apply does.
        spark.conf.set("spark.databricks.delta.write.txnAppId", app_id)
        spark.conf.set("spark.databricks.delta.write.txnVersion", str(batch_id))
        spark.conf.set("spark.databricks.delta.schema.autoMerge.enabled", "true")
        merge_tombstones(spark, changes, tombstones, keys)
        assignments = {c: f"{rules.SOURCE_ALIAS}.`{c}`" for c in columns}
        (
            DeltaTable.forName(spark, target)
            .alias(rules.TARGET_ALIAS)
            .merge(changes.alias(rules.SOURCE_ALIAS), rules.merge_predicate(keys))
            .whenMatchedDelete(condition=rules.DELETE_WHEN)
            .whenMatchedUpdate(condition=rules.UPDATE_WHEN, set=assignments)
            .whenNotMatchedInsert(condition=rules.INSERT_WHEN, values=assignments)
            .execute()
        )
        changes.unpersist()

    return upsert


def maintain(spark: SparkSession, target: str, tombstone_retention_hours: int) -> None:
    """Expire old tombstones, then compact and vacuum both tables (Delta's retention)."""
    tombstones = tombstone_table(target)
    if spark.catalog.tableExists(tombstones):
        cutoff = F.expr(f"current_timestamp() - INTERVAL {int(tombstone_retention_hours)} HOURS")
        DeltaTable.forName(spark, tombstones).delete(F.col(rules.EVENT_TIME_COLUMN) < cutoff)
    for table in (target, tombstones):
        if spark.catalog.tableExists(table):
            DeltaTable.forName(spark, table).optimize().executeCompaction()
            DeltaTable.forName(spark, table).vacuum()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spark = SparkSession.builder.getOrCreate()
    if args.maintain:
        maintain(spark, args.target, args.tombstone_retention_hours)
        return
    if args.bootstrap:
        keys = [k.strip() for k in args.keys.split(",") if k.strip()]
        bootstrap(spark, args.bootstrap, args.target, keys)
        return
    spark.conf.set("spark.sql.caseSensitive", "true")  # "Name" and "name" are two attributes
    stream = (
        spark.readStream.format("cloudFiles")
        .option("cloudFiles.format", "text" if args.format == "incremental-export" else args.format)
        .option("cloudFiles.schemaLocation", f"{args.checkpoint}/schema")
        .option("cloudFiles.inferColumnTypes", "true")
        .option("cloudFiles.schemaEvolutionMode", "addNewColumns")
        .load(
            f"{args.source}/AWSDynamoDB/*/data/"
            if args.format == "incremental-export"
            else args.source
        )
    )
    upsert = make_upsert(spark, args.target, args.source, args.format)
    writer = stream.writeStream.foreachBatch(upsert).option(
        "checkpointLocation", f"{args.checkpoint}/stream"
    )
    if args.processing_time:
        writer = writer.trigger(processingTime=args.processing_time)
    else:
        writer = writer.trigger(availableNow=True)
    writer.start().awaitTermination()


if __name__ == "__main__":
    main()
