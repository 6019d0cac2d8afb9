"""``worker dlq show`` and ``worker dlq redrive``: the loader's dead letters, what each
names, and, for a ledger run's file, what the ledger says of it.

A message is read with a short visibility timeout and handed back at once
(``show``), or sent to the loader queue and then deleted (``redrive``). A
tracked file that has ended (``failed``, or loaded by a later delivery) is not
moved: its redelivery would be acknowledged without loading anything, so
``redrive`` says so and names the run to submit instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from worker.core.errors import MalformedMessage
from worker.ledger.models import OPEN_FILE
from worker.loader.messages import parse_body

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

    from worker.ledger.runs import Ledger

_PEEK_S = 30  # how long a read message is hidden before it is handed back


@dataclass(frozen=True, slots=True)
class DeadLetter:
    message: dict[str, Any]
    names: list[str]  # the s3:// objects the body names
    ended: list[str]  # tracked files of those that have ended: "fileId: status (reason)"
    run: dict[str, str] | None  # the dataset and date of a tracked file, to submit again

    def view(self) -> dict[str, Any]:
        receives = self.message.get("Attributes", {}).get("ApproximateReceiveCount")
        return {"messageId": self.message["MessageId"], "receives": receives,
                "objects": self.names, "ended": self.ended}  # fmt: skip


async def read(sqs: SQSClient, dlq: str, ledger: Ledger | None, most: int) -> list[DeadLetter]:
    """Up to ``most`` messages of the DLQ, each with what it names."""
    letters: list[DeadLetter] = []
    seen: set[str] = set()
    while len(letters) < most:
        got = await sqs.receive_message(
            QueueUrl=dlq, MaxNumberOfMessages=min(10, most - len(letters)),
            VisibilityTimeout=_PEEK_S, MessageSystemAttributeNames=["ApproximateReceiveCount"],
        )  # fmt: skip
        fresh = [m for m in got.get("Messages", []) if m["MessageId"] not in seen]
        if not fresh:
            break
        for message in fresh:
            seen.add(message["MessageId"])
            letters.append(await _letter(message, ledger))
    return letters


async def _letter(message: Any, ledger: Ledger | None) -> DeadLetter:
    try:
        refs = parse_body(message.get("Body", ""))
    except MalformedMessage as exc:
        return DeadLetter(dict(message), [f"(malformed: {exc.message})"], [], None)
    ended: list[str] = []
    run = None
    for ref in refs:
        if ref.tracked is None or ledger is None:
            continue
        record = await ledger.store.get(ledger.store.settings.file_table, "fileId",
                                        ref.tracked.file_id)  # fmt: skip
        if record is not None:
            run = {"dataset": record["datasetName"], "date": record["businessDate"]}
        if record is not None and record["status"] not in OPEN_FILE:
            reason = (record.get("error") or {}).get("reason", "")
            ended.append(f"{ref.tracked.file_id}: {record['status']} {reason}".rstrip())
    return DeadLetter(dict(message), [ref.uri for ref in refs], ended, run)


async def hand_back(sqs: SQSClient, dlq: str, letters: list[DeadLetter]) -> None:
    for letter in letters:
        await sqs.change_message_visibility(
            QueueUrl=dlq, ReceiptHandle=letter.message["ReceiptHandle"], VisibilityTimeout=0
        )


async def redrive(sqs: SQSClient, dlq: str, to: str, letters: list[DeadLetter]) -> list[str]:
    """Move every letter whose files are not all ended back to ``to``; one line each."""
    lines = []
    for letter in letters:
        message_id = letter.message["MessageId"]
        if letter.ended and letter.run is not None:
            run = letter.run
            lines.append(
                f"{message_id}: kept: its file ended ({'; '.join(letter.ended)}), so a "
                f"redelivery would load nothing; submit a new run instead: worker runs submit "
                f"{run['dataset']} {run['date']} --supersede"
            )
            await hand_back(sqs, dlq, [letter])
            continue
        await sqs.send_message(QueueUrl=to, MessageBody=letter.message["Body"])
        await sqs.delete_message(QueueUrl=dlq, ReceiptHandle=letter.message["ReceiptHandle"])
        lines.append(f"{message_id}: moved to the loader queue ({', '.join(letter.names)})")
    return lines


def dumps(letter: DeadLetter) -> str:
    return orjson.dumps(letter.view()).decode()
