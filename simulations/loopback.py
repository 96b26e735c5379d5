"""An in-process Flower Grid for tests and the bench: no Ray, no SuperLink, no network.

`LoopbackGrid` hands every message the ServerApp sends, deep-copied as the wire would, to a
ClientApp called in this process, one site after another, and keeps a copy of every reply
it received (`received`) and a log of each delivery (`deliveries`). It can model sites that
drop out: for every message `drop(message)` is true for, no reply comes back, exactly as
Flower's `send_and_receive` omits a node that did not answer before the timeout (the
message still reaches the ClientApp first when `deliver_dropped` is true, i.e. the site
did the work and then vanished; otherwise it never arrives).

`task_identity` sets what a ServerApp process has set before it runs the app (the
run/node/task ids of `flwr.supercore.task_identity.TaskIdentity`, which Flower's legacy
workflows read) and restores the previous values afterwards.

    grid = LoopbackGrid(app, {1: {"data-path": ...}, 2: {...}}, drop=drop_at(2, "unmask"))
    with task_identity():
        run_federation(grid, study, Context(1, 0, {}, RecordDict(), {}))
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

__all__ = ["Delivery", "LoopbackGrid", "drop_at", "secagg_stage", "task_identity", "wire_bytes"]


@dataclass(frozen=True)
class Delivery:
    """One message handed to a site: who, what, and how long the ClientApp took."""

    node_id: int
    message_type: str
    stage: str | None  # the SecAgg+ stage, None for a plain message
    started: float  # time.perf_counter() when the grid took the message
    seconds: float  # wall time of the ClientApp call (0.0 when it never arrived)
    replied: bool  # False when the grid dropped the reply
    sent_bytes: int = 0  # the message's content as Flower serialises it for the wire
    reply_bytes: int = 0  # the reply's content likewise (0: dropped, or an error)


def wire_bytes(content: RecordDict) -> int:
    """Bytes of a message's content in Flower's wire format (its protobuf)."""
    return recorddict_to_proto(content).ByteSize()


def secagg_stage(message: Message) -> str | None:
    """The SecAgg+ stage a server message asks for ("setup", "share_keys",
    "collect_masked_vectors", "unmask"), or None when it is not a SecAgg+ message."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    records = message.content.config_records
    if RECORD_KEY_CONFIGS not in records:
        return None
    stage = records[RECORD_KEY_CONFIGS].get(Key.STAGE)
    return str(stage) if stage is not None else None


def drop_at(node_id: int, stage: str | None = None) -> Callable[[Message], bool]:
    """A `drop` predicate: node `node_id` does not answer from its first message at
    `stage` on (any SecAgg+ stage name, or "train" for the plain/first fit message; None:
    it never answers). Once dropped it stays dropped, as a site that went away would."""
    gone = False

    def starts(message: Message) -> bool:
        at = secagg_stage(message)
        if stage is None:
            return True
        if stage == "train":  # the message that carries the fit instructions
            return message.metadata.message_type.startswith("train") and at in (
                None,
                "collect_masked_vectors",
            )
        return at == stage

    def drop(message: Message) -> bool:
        nonlocal gone
        if message.metadata.dst_node_id != node_id:
            return False
        gone = gone or starts(message)
        return gone

    return drop


class LoopbackGrid(Grid):
    """Delivers each message to a ClientApp in process; keeps every reply it received.

    `nodes`: the node ids, or a mapping node id -> node config (what `--node-config` gives
    a SuperNode: data-path, state-dir, ...). `run_config` goes into every node's Context.
    `drop`: for a message it returns True for, the reply is left out of `send_and_receive`
    (see the module docstring). Sites run one after another, so the sum of their
    delivery times is the sites' share of a round's wall time.
    """

    def __init__(
        self,
        app: ClientApp,
        nodes: Iterable[int] | Mapping[int, Mapping[str, object]],
        *,
        run_config: Mapping[str, object] | None = None,
        drop: Callable[[Message], bool] | None = None,
        deliver_dropped: bool = True,
    ) -> None:
        self.app = app
        configs = nodes if isinstance(nodes, Mapping) else {n: {} for n in nodes}
        self.contexts = {
            int(n): Context(
                run_id=1,
                node_id=int(n),
                node_config=dict(cfg),
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for n, cfg in configs.items()
        }
        self.drop = drop
        self.deliver_dropped = deliver_dropped
        self.received: list[Message] = []
        self.deliveries: list[Delivery] = []

    def set_run(self, run_id):  # pragma: no cover - not used
        pass

    @property
    def run(self):
        return SimpleNamespace(run_id=1)  # the client manager's proxies only read run_id

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):  # pragma: no cover - not used
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover - not used
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for sent in messages:
            meta = sent.metadata
            msg = Message(
                copy.deepcopy(sent.content),
                meta.dst_node_id,
                meta.message_type,
                group_id=meta.group_id,
            )
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            stage = secagg_stage(msg)
            dropped = self.drop is not None and self.drop(msg)
            start, seconds = time.perf_counter(), 0.0
            if not dropped or self.deliver_dropped:
                try:
                    reply = self.app(msg, self.contexts[meta.dst_node_id])
                except Exception as exc:  # Flower's own format for a ClientApp's exception
                    reason = str(type(exc)) + ":<'" + str(exc) + "'>"
                    reply = Message(Error(code=0, reason=reason), reply_to=msg)
                seconds = time.perf_counter() - start
            answered = not dropped and not reply.has_error()
            self.deliveries.append(
                Delivery(
                    meta.dst_node_id,
                    meta.message_type,
                    stage,
                    start,
                    seconds,
                    not dropped,
                    wire_bytes(sent.content),
                    wire_bytes(reply.content) if answered else 0,
                )
            )
            if dropped:
                continue
            self.received.append(copy.deepcopy(reply))
            replies.append(reply)
        return replies


@contextlib.contextmanager
def task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> Iterator[None]:
    """Set TaskIdentity's run/node/task ids as a ServerApp process has them; restore after."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = run_id, node_id, task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
