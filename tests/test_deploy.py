"""deploy/template.yaml, read back after the SAM transform (offline, aws-sam-translator),
and checked against what the code really calls (issue: deployment as code).

No AWS account here: ``cfn-lint`` and ``checkov`` run in ``make lint``; these tests
read the expanded template, and prove least privilege by recording every AWS
operation the worker performs in a scenario that runs each component, then
comparing with the roles' grants both ways.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse

from tests import factories as f
from tests.conftest import BUCKET, scan
from tests.processes import ROOT
from worker.core.config import LedgerSettings, Settings

TEMPLATE = ROOT / "deploy" / "template.yaml"
SHUTDOWN_GRACE_S = 25


class _NoManagedPolicies:
    def load(self) -> dict[str, str]:
        return {}  # every role is written out in full: nothing to look up in IAM


def expand(path: Path = TEMPLATE) -> dict[str, Any]:
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")  # SAM's pseudo-parameters
    params = {"ImageUri": "123.dkr.ecr.us-east-1.amazonaws.com/worker:1", "SchemaPrefix": "p",
              "SourceBucketName": "in"}  # fmt: skip
    expanded: dict[str, Any] = transform(yaml_parse(path.read_text()), params, _NoManagedPolicies())
    return expanded


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return expand()


def of_type(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {k: r for k, r in template["Resources"].items() if r["Type"] == kind}


def props(template: dict[str, Any], name: str) -> dict[str, Any]:
    properties: dict[str, Any] = template["Resources"][name]["Properties"]
    return properties


def test_the_queue_hides_a_message_for_six_function_timeouts_plus_the_window(
    template: dict[str, Any],
) -> None:
    (mapping,) = [
        r for r in of_type(template, "AWS::Lambda::EventSourceMapping").values()
        if "LoaderQueue" in str(r["Properties"]["EventSourceArn"])
    ]  # fmt: skip
    window = mapping["Properties"]["MaximumBatchingWindowInSeconds"]
    visibility = props(template, "LoaderQueue")["VisibilityTimeout"]
    assert visibility == {"Fn::FindInMap": ["Visibility", {"Ref": "FunctionTimeoutS"}, "Seconds"]}
    timeouts = template["Parameters"]["FunctionTimeoutS"]["AllowedValues"]
    for timeout in timeouts:  # every timeout a deployer may choose has its visibility
        seconds = template["Mappings"]["Visibility"][str(timeout)]["Seconds"]
        assert seconds >= 6 * int(timeout) + window


def test_every_queue_is_encrypted_and_the_loader_queue_dead_letters_after_five(
    template: dict[str, Any],
) -> None:
    queues = of_type(template, "AWS::SQS::Queue")
    assert queues and all(q["Properties"]["SqsManagedSseEnabled"] for q in queues.values())
    redrive = props(template, "LoaderQueue")["RedrivePolicy"]
    assert redrive["maxReceiveCount"] >= 5
    assert redrive["deadLetterTargetArn"] == {"Fn::GetAtt": ["LoaderDeadLetterQueue", "Arn"]}


def test_both_mappings_report_batch_item_failures_and_the_stream_retries_finitely(
    template: dict[str, Any],
) -> None:
    mappings = {
        k: r["Properties"] for k, r in of_type(template, "AWS::Lambda::EventSourceMapping").items()
    }
    assert len(mappings) == 2
    for mapping in mappings.values():
        assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    sqs, stream = mappings["LoaderFunctionQueue"], mappings["StreamsFunctionStream"]
    assert sqs["ScalingConfig"]["MaximumConcurrency"] == {"Ref": "LoaderMaxConcurrency"}
    assert stream["BisectBatchOnFunctionError"] is True
    assert 0 < stream["MaximumRetryAttempts"] <= 10000
    assert 60 <= stream["MaximumRecordAgeInSeconds"] <= 604800
    assert "StreamsFailureQueue" in str(stream["DestinationConfig"]["OnFailure"]["Destination"])


def test_the_raw_bucket_is_private_encrypted_tls_only_and_expires(template: dict[str, Any]) -> None:
    bucket = props(template, "RawBucket")
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    assert len(bucket["PublicAccessBlockConfiguration"]) == 4
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert bucket["LifecycleConfiguration"]["Rules"][0]["ExpirationInDays"] > 0
    (statement,) = props(template, "RawBucketPolicy")["PolicyDocument"]["Statement"]
    assert statement["Effect"] == "Deny"
    assert statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_the_ledger_tables_keep_their_schema_with_recovery_and_prod_protection(
    template: dict[str, Any],
) -> None:
    indexes = {
        "RunTable": {"datasetName-businessDate-index", "status-index"},
        "FileTable": {"runId-index", "datasetName-status-index"},
        "DatasetTable": set(),
    }
    for name, wanted in indexes.items():
        table = props(template, name)
        assert table["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
        assert table["DeletionProtectionEnabled"] == {"Fn::If": ["IsProd", True, False]}
        assert {i["IndexName"] for i in table.get("GlobalSecondaryIndexes", [])} == wanted
    cache = props(template, "EventCacheTable")
    assert cache["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}


def test_the_api_is_behind_iam_auth(template: dict[str, Any]) -> None:
    (url,) = of_type(template, "AWS::Lambda::Url").values()
    assert url["Properties"]["AuthType"] == "AWS_IAM"
    assert not of_type(template, "AWS::ApiGatewayV2::Api")  # nothing else exposes it


def test_the_delivery_stream_partitions_dynamically_through_the_transform(
    template: dict[str, Any],
) -> None:
    s3 = props(template, "DeliveryStream")["ExtendedS3DestinationConfiguration"]
    assert s3["DynamicPartitioningConfiguration"]["Enabled"] is True
    assert "!{firehose:error-output-type}" in s3["ErrorOutputPrefix"]
    for key in ("event_type", "event_subtype", "year", "month", "day", "hour"):
        assert f"{key}=!{{partitionKeyFromLambda:{key}}}" in s3["Prefix"]
    (processor,) = s3["ProcessingConfiguration"]["Processors"]
    assert processor["Type"] == "Lambda"


def test_the_ecs_service_polls_checks_health_drains_and_scales_on_backlog_per_task(
    template: dict[str, Any],
) -> None:
    task = props(template, "LoaderTaskDefinition")
    (container,) = task["ContainerDefinitions"]
    assert container["Command"] == ["worker", "poll"]
    assert container["HealthCheck"]["Command"] == ["CMD", "worker", "health"]
    grace = {e["Name"]: e["Value"] for e in container["Environment"]}["SHUTDOWN_GRACE_S"]
    assert container["StopTimeout"] > int(grace) == SHUTDOWN_GRACE_S
    assert task["TaskRoleArn"] != task["ExecutionRoleArn"]
    policy = props(template, "LoaderBacklogScaling")["TargetTrackingScalingPolicyConfiguration"]
    metrics = {m["Id"]: m for m in policy["CustomizedMetricSpecification"]["Metrics"]}
    (returned,) = [m for m in metrics.values() if m["ReturnData"]]
    assert re.fullmatch(r"visible / IF\(tasks > 0, tasks, 1\)", returned["Expression"])
    assert (
        metrics["visible"]["MetricStat"]["Metric"]["MetricName"]
        == "ApproximateNumberOfMessagesVisible"
    )
    assert metrics["tasks"]["MetricStat"]["Metric"]["MetricName"] == "RunningTaskCount"


def test_the_alarms_cover_every_failure_signal(template: dict[str, Any]) -> None:
    watched = set()
    for alarm in of_type(template, "AWS::CloudWatch::Alarm").values():
        p = alarm["Properties"]
        assert p["AlarmActions"]
        for metric in [p] + [
            m["MetricStat"]["Metric"] for m in p.get("Metrics", []) if "MetricStat" in m
        ]:
            if "MetricName" in metric:
                watched.add((metric["Namespace"], metric["MetricName"]))
    assert {
        ("AWS/SQS", "ApproximateNumberOfMessagesVisible"),  # the DLQs
        ("AWS/SQS", "ApproximateAgeOfOldestMessage"),
        ("AWS/Lambda", "IteratorAge"),
        ("AWS/Lambda", "Errors"),
        ("AWS/Lambda", "Throttles"),
        ("AWS/Firehose", "ExecuteProcessing.Success"),
        ("worker", "FailedMessages"),
        ("worker", "RecordsFailed"),
    } <= watched


def test_no_grant_uses_a_wildcard_action_or_resource(template: dict[str, Any]) -> None:
    for name, role in of_type(template, "AWS::IAM::Role").items():
        for policy in role["Properties"].get("Policies", []):
            for statement in policy["PolicyDocument"]["Statement"]:
                statement = statement.get("Fn::If", [None, statement])[1]
                actions = (
                    statement["Action"]
                    if isinstance(statement["Action"], list)
                    else [statement["Action"]]
                )
                assert not any("*" in action for action in actions), name
                assert statement["Resource"] != "*", name


# --- deployed on moto's CloudFormation -----------------------------------------------

SERVICE_RUNTIME = {"AWS::Lambda::Function", "AWS::Lambda::EventSourceMapping", "AWS::Lambda::Url"}


def moto_subset(template: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """The expanded template, less what moto's CloudFormation cannot create (and the
    functions, whose image it cannot run), less whatever refers to those."""
    from moto.cloudformation.parsing import get_model_map

    known = get_model_map()
    kept = {
        name: resource
        for name, resource in template["Resources"].items()
        if resource["Type"] in known and resource["Type"] not in SERVICE_RUNTIME
    }
    dropped = set(template["Resources"]) - set(kept)
    while True:
        referring = {name for name, resource in kept.items() if _refs(resource) & dropped}
        if not referring:
            break
        dropped |= referring
        kept = {name: r for name, r in kept.items() if name not in referring}
    outputs = {k: v for k, v in template.get("Outputs", {}).items() if not _refs(v) & dropped}
    return {**template, "Resources": kept, "Outputs": outputs}, dropped


def _refs(node: Any) -> set[str]:
    text = orjson.dumps(node).decode()
    return (
        set(re.findall(r'"Ref":"([A-Za-z0-9]+)"', text))
        | set(re.findall(r'"Fn::GetAtt":\["([A-Za-z0-9]+)"', text))
        | set(re.findall(r"\$\{([A-Za-z0-9]+)[.}]", text))
    )


def test_the_template_deploys_on_moto_and_what_it_made_loads_a_message(
    moto: str, template: dict[str, Any], install_runtime: Any, prefix: str
) -> None:
    subset, _ = moto_subset(template)
    kept = {"LoaderQueue", "LoaderDeadLetterQueue", "RunTable", "FileTable", "DatasetTable",
            "RawBucket", "LoaderFunctionRole", "EventCacheTable"}  # fmt: skip
    assert kept <= set(subset["Resources"])
    cfn = boto3.client("cloudformation")
    params = {"ImageUri": "123.dkr.ecr.us-east-1.amazonaws.com/worker:1", "SchemaPrefix": prefix,
              "SourceBucketName": BUCKET, "LoaderMode": "lambda"}  # fmt: skip
    cfn.create_stack(
        StackName="worker",
        TemplateBody=orjson.dumps(subset).decode(),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
        Capabilities=["CAPABILITY_IAM"],
    )
    stack = cfn.describe_stacks(StackName="worker")["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack
    summaries = cfn.list_stack_resources(StackName="worker")["StackResourceSummaries"]
    made = {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in summaries}
    sqs = boto3.client("sqs")
    queue_url = made["LoaderQueue"]
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    assert int(attributes["VisibilityTimeout"]) == 1805  # 6 x 300 s + 5 s
    assert orjson.loads(attributes["RedrivePolicy"])["maxReceiveCount"] == 5

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="k.pb", Body=f.output_file(("t", ["id"], [["x"], ["y"]])))
    boto3.client("sqs").send_message(
        QueueUrl=queue_url, MessageBody=orjson.dumps({"bucket": BUCKET, "key": "k.pb"}).decode()
    )
    (message,) = boto3.client("sqs").receive_message(QueueUrl=queue_url)["Messages"]
    settings = Settings(
        schema_prefix=prefix, source_buckets=(BUCKET,),
        ledger=LedgerSettings(run_table=made["RunTable"], file_table=made["FileTable"],
                              dataset_table=made["DatasetTable"], loader_queue_url=queue_url),
    )  # fmt: skip
    handler = install_runtime(settings)
    record = f.sqs_record(message["Body"], message["MessageId"])
    assert handler(f.sqs_event(record), f.LambdaContext()) == {"batchItemFailures": []}
    items = scan(boto3.client("dynamodb"), f"{prefix}_t")
    assert sorted(i["id"]["S"] for i in items) == ["x", "y"]


_INSIGHTS_WORDS = {"fields", "filter", "stats", "count", "sort", "desc", "asc", "limit", "by",
                   "and", "or", "not", "like", "in", "as", "bin", "display",
                   "ispresent"}  # fmt: skip


def logged_fields() -> set[str]:
    """Every field a log line of the worker can carry: the keywords of each logger
    call and of each bound context in the source, an error's fields, structlog's."""
    import ast

    fields = {"event", "level", "timestamp", "error", "error_message", "retriable"}
    for path in (ROOT / "worker").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            logger = isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and (
                func.value.id in {"log", "_metrics_log"}
            )  # fmt: skip
            bound = isinstance(func, ast.Name) and func.id == "bound_contextvars"
            if logger or bound:
                fields |= {k.arg for k in node.keywords if k.arg}
    return fields


def test_every_alarm_has_its_runbook_section_and_its_queries_name_fields_the_logs_carry(
    template: dict[str, Any],
) -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")
        for heading in re.findall(r"^## (.+)$", runbook, re.MULTILINE)
    }
    alarms = {name: resource["Properties"] for name, resource in template["Resources"].items()
              if resource["Type"] == "AWS::CloudWatch::Alarm"}  # fmt: skip
    assert len(alarms) >= 13
    for name, properties in alarms.items():
        assert name.lower() in anchors, f"{name} has no section in docs/runbook.md"
        assert f"docs/runbook.md#{name.lower()}" in properties["AlarmDescription"], name
    fields = logged_fields()
    queries = re.findall(r"```logs-insights\n(.*?)```", runbook, re.DOTALL)
    assert len(queries) >= len(alarms)
    for query in queries:
        words = re.sub(r'"[^"]*"', "", query)
        aliases = set(re.findall(r"\bas (\w+)", words))
        named = set(re.findall(r"\b[a-z_][a-z0-9_]*\b", words)) - _INSIGHTS_WORDS - aliases
        assert named <= fields, f"fields no log line carries: {named - fields} in {query}"


def test_the_dashboard_shows_every_metric_an_alarm_watches(template: dict[str, Any]) -> None:
    dashboard = template["Resources"]["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    body = orjson.loads(re.sub(r"\$\{[^}]+\}", "x", dashboard))  # valid JSON once substituted
    shown = orjson.dumps(body["widgets"]).decode()
    for name, resource in template["Resources"].items():
        if resource["Type"] != "AWS::CloudWatch::Alarm":
            continue
        properties = resource["Properties"]
        metrics = [m["MetricStat"]["Metric"] for m in properties.get("Metrics", [])
                   if "MetricStat" in m]  # fmt: skip
        for metric in [properties, *metrics]:
            if "MetricName" in metric:
                assert metric["MetricName"] in shown, f"{name}: {metric['MetricName']}"


def test_the_source_bucket_reaches_the_queue_through_the_stacks_rule_only() -> None:
    template = expand()
    rule = template["Resources"]["SourceObjectCreatedRule"]["Properties"]
    assert rule["EventPattern"]["detail-type"] == ["Object Created"]
    assert rule["Targets"][0]["Arn"] == {"Fn::GetAtt": ["LoaderQueue", "Arn"]}
    policy = template["Resources"]["LoaderQueuePolicy"]["Properties"]["PolicyDocument"]
    (allow,) = [s for s in policy["Statement"] if s["Effect"] == "Allow"]
    assert allow["Principal"] == {"Service": "events.amazonaws.com"}
    assert allow["Action"] == "sqs:SendMessage"
    assert allow["Condition"] == {
        "ArnEquals": {"aws:SourceArn": {"Fn::GetAtt": ["SourceObjectCreatedRule", "Arn"]}}
    }


def test_kms_decrypt_is_granted_on_the_given_key_only_and_only_when_given() -> None:
    template = expand()
    for role in ("LoaderFunctionRole", "LoaderTaskRole"):
        (policy,) = template["Resources"][role]["Properties"]["Policies"]
        (optional,) = [s for s in policy["PolicyDocument"]["Statement"] if "Fn::If" in s]
        condition, grant, otherwise = optional["Fn::If"]
        assert condition == "SourceKms" and otherwise == {"Ref": "AWS::NoValue"}
        assert grant["Action"] == "kms:Decrypt" and grant["Resource"] == {"Ref": "SourceKmsKeyArn"}
    assert template["Conditions"]["SourceKms"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "SourceKmsKeyArn"}, ""]}]
    }


def test_no_function_reserves_concurrency_unless_asked() -> None:
    template = expand()
    for name, resource in template["Resources"].items():
        reserved = resource.get("Properties", {}).get("ReservedConcurrentExecutions")
        if resource["Type"] == "AWS::Lambda::Function" and reserved is not None:
            assert reserved["Fn::If"][0] == "Reserve", name
            assert reserved["Fn::If"][2] == {"Ref": "AWS::NoValue"}, name


def test_every_parameter_is_described() -> None:
    parameters = expand()["Parameters"]
    assert [name for name, p in parameters.items() if not p.get("Description")] == []
