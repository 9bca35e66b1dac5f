"""Server component that measures what each site really puts on the wire, and when.

FLARE 2.9 does not send a task result's tensors inside the result message: the
``submitUpdate`` message carries references, and the server job cell then pulls the
tensors from the site in chunks (``ViaDownloaderDecomposer``, 2 MB chunks). A filter
or a re-serialisation of the result Shareable would therefore miss or invent bytes.
``WireMeter`` instead registers an *incoming filter* on the server job's core cell
(``CoreCell.add_incoming_filter("*", "*")``, FLARE's own hook, called for every
message before it is decoded), so it sees each message exactly as it arrived: the
encoded payload (FOBS bytes, tensor chunks) plus the SFM frame around it (prefix and
msgpack-encoded headers, as ``sfm.conn_manager`` frames a message). Only the
transport's own framing below SFM (gRPC/TCP/TLS) is not counted.

Bytes are charged to the site named first in the message's origin (``site-1`` for
``site-1.<job id>``). When a task result reaches the server (``BEFORE_TASK_RESULT_FILTER``,
after all its chunks arrived, before the server's filters such as the int8
dequantiser ran), the site's bytes since its previous result are recorded against
that result, together with the tensor bytes the result carries (as received, and
after the server's result filters). Task dispatch times are recorded too
(``AFTER_TASK_DATA_FILTER``), so job start-up (first training task) and each site's
round trip can be read from the same file. The server process's own memory (VmRSS
and its peak VmHWM, from /proc/self/status) is sampled at every result and at the end
of the run, since the meter runs inside the server process (in the simulator too,
where that is not the process the user started). The record is a JSON file,
rewritten at the start, after every result and at the end of the run.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import msgpack
from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.fuel.f3.cellnet.utils import buffer_len
from nvflare.fuel.f3.sfm.prefix import PREFIX_LEN

from fedmed_components.data.files import atomic_write_text
from fedmed_components.model.modeling import adapter_num_bytes


def message_wire_bytes(message) -> tuple[int, int]:
    """(payload bytes, SFM frame bytes) of a received cellnet message."""
    payload = buffer_len(message.payload)
    try:
        headers = len(msgpack.packb(message.headers, default=str))
    except (TypeError, ValueError):  # a direct in-process message may hold odd header values
        headers = len(json.dumps(message.headers, default=str))
    return payload, PREFIX_LEN + headers + payload


def site_of(origin: str | None) -> str:
    """``site-1.<job id>`` -> ``site-1`` (a cell's first name is its site or server)."""
    return (origin or "?").split(".", 1)[0]


class ByteLedger:
    """Per-site byte counts, thread-safe: running totals and bytes since the last take."""

    def __init__(self):
        self._lock = threading.Lock()
        self.totals: dict[str, dict[str, int]] = {}
        self._pending: dict[str, dict[str, int]] = {}

    def add(self, site: str, payload: int, frame: int) -> None:
        with self._lock:
            for book in (self.totals, self._pending):
                entry = book.setdefault(site, {"messages": 0, "payload_bytes": 0, "frame_bytes": 0})
                entry["messages"] += 1
                entry["payload_bytes"] += payload
                entry["frame_bytes"] += frame

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {site: dict(entry) for site, entry in self.totals.items()}

    def take(self, site: str) -> dict[str, int]:
        """Bytes received from `site` since the previous take (and forget them)."""
        with self._lock:
            return self._pending.pop(site, {"messages": 0, "payload_bytes": 0, "frame_bytes": 0})


def result_tensor_bytes(shareable) -> tuple[int, int]:
    """(tensor bytes, tensor count) of a task result's parameters; (0, 0) if it has none."""
    if shareable is None:
        return 0, 0
    try:
        dxo = from_shareable(shareable)
    except (ValueError, TypeError, AttributeError):  # an error reply or a metrics-only answer
        return 0, 0
    if not isinstance(dxo.data, dict):
        return 0, 0
    tensors = {k: v for k, v in dxo.data.items() if hasattr(v, "element_size") and hasattr(v, "numel")}
    arrays = {k: v for k, v in dxo.data.items() if hasattr(v, "nbytes") and k not in tensors}
    return adapter_num_bytes(tensors) + sum(int(v.nbytes) for v in arrays.values()), len(tensors) + len(arrays)


def process_memory() -> dict[str, int]:
    """This process's resident set now and its peak, in bytes ({} where /proc is absent)."""
    found = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    found["rss_bytes" if line.startswith("VmRSS") else "peak_rss_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return found


class WireMeter(FLComponent):
    """Count every byte each site sends to the server job cell; record dispatch and result times.

    ``out_file``: where the JSON record goes (relative: inside the job's run folder).
    """

    def __init__(self, out_file: str = "wire_meter.json"):
        super().__init__()
        self.out_file = out_file
        self.ledger = ByteLedger()
        self.record: dict = {"server_pid": os.getpid(), "start_run_time": None, "dispatches": [], "results": []}
        self._path: Path | None = None
        self._attached = False
        self._lock = threading.Lock()

    # -------------------------------------------------------------- cell hook
    def on_incoming(self, message, *args, **kwargs):
        """CoreCell incoming filter: count, never stop the message (returns None)."""
        from nvflare.fuel.f3.cellnet.defs import MessageHeaderKey

        payload, frame = message_wire_bytes(message)
        self.ledger.add(site_of(message.get_header(MessageHeaderKey.ORIGIN)), payload, frame)
        return None

    def _attach(self, fl_ctx: FLContext) -> None:
        cell = fl_ctx.get_engine().get_cell()
        core = getattr(cell, "core_cell", cell)
        if core is None or not hasattr(core, "add_incoming_filter"):
            self.log_warning(fl_ctx, "wire meter: no cellnet cell on this engine; nothing will be counted")
            return
        core.add_incoming_filter("*", "*", self.on_incoming)
        self._attached = True
        self.log_info(fl_ctx, f"wire meter: counting every message arriving at {core.get_fqcn()}")

    # ----------------------------------------------------------------- events
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self.record["start_run_time"] = time.time()
            self._path = self._resolve(fl_ctx)
            if not self._attached:
                self._attach(fl_ctx)
            self.record.update(server_pid=os.getpid(), memory_at_start=process_memory())
            self._write()
        elif event_type == EventType.AFTER_TASK_DATA_FILTER:
            self.record["dispatches"].append({"site": _peer(fl_ctx), "task": fl_ctx.get_prop(FLContextKey.TASK_NAME), "time": time.time()})
        elif event_type == EventType.BEFORE_TASK_RESULT_FILTER:
            site = _peer(fl_ctx)
            tensor_bytes, tensors = result_tensor_bytes(fl_ctx.get_prop(FLContextKey.TASK_RESULT))
            entry = {
                "site": site,
                "task": fl_ctx.get_prop(FLContextKey.TASK_NAME),
                "time": time.time(),
                "tensor_bytes_received": tensor_bytes,
                "tensors": tensors,
                **self.ledger.take(site),
                **process_memory(),
            }
            with self._lock:
                self.record["results"].append(entry)
        elif event_type == EventType.AFTER_TASK_RESULT_FILTER:
            restored, _ = result_tensor_bytes(fl_ctx.get_prop(FLContextKey.TASK_RESULT))
            site = _peer(fl_ctx)
            with self._lock:
                for entry in reversed(self.record["results"]):
                    if entry["site"] == site and "tensor_bytes_restored" not in entry:
                        entry["tensor_bytes_restored"] = restored
                        break
            self._write()
        elif event_type == EventType.END_RUN:
            self.record["memory_at_end"] = process_memory()
            self._write()

    def _resolve(self, fl_ctx: FLContext) -> Path:
        path = Path(self.out_file)
        if not path.is_absolute():
            path = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())) / path
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _write(self) -> None:
        if self._path is None:
            return
        with self._lock:
            data = {**self.record, "totals": self.ledger.snapshot()}
        atomic_write_text(self._path, json.dumps(data, indent=2))


def _peer(fl_ctx: FLContext) -> str:
    peer = fl_ctx.get_peer_context()
    return peer.get_identity_name() if peer is not None else "?"
