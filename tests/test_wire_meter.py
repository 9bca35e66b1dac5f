"""WireMeter: what each site's messages bring to the server, counted as they arrive."""

import json
import sys
from pathlib import Path

import msgpack
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.shareable import Shareable
from nvflare.fuel.f3.cellnet.defs import MessageHeaderKey
from nvflare.fuel.f3.message import Message
from nvflare.fuel.f3.sfm.prefix import PREFIX_LEN
from nvflare.fuel.utils import fobs

from fedmed_components.flare.wire_meter import ByteLedger, WireMeter, message_wire_bytes, result_tensor_bytes, site_of


class FakeContext:
    """The few FLContext calls the meter makes at a task event."""

    def __init__(self, site, task, result=None):
        self.props = {FLContextKey.TASK_NAME: task, FLContextKey.TASK_RESULT: result}
        self.site = site

    def get_prop(self, key, default=None):
        return self.props.get(key, default)

    def get_peer_context(self):
        site = self.site

        class Peer:
            def get_identity_name(self):
                return site

        return Peer()


def _message(origin: str, payload: bytes) -> Message:
    return Message({MessageHeaderKey.ORIGIN: origin, MessageHeaderKey.TOPIC: "submitUpdate"}, payload)


def _adapter_result(n: int = 3) -> Shareable:
    params = {f"base_model.model.layers.{i}.q_proj.lora_A.weight": torch.ones(4, 8) for i in range(n)}
    return DXO(data_kind=DataKind.WEIGHTS, data=params).to_shareable()


def test_message_bytes_are_the_encoded_payload_plus_its_sfm_frame():
    payload = fobs.dumps({"x": list(range(100))})
    message = _message("site-1.job42", payload)
    payload_len, frame_len = message_wire_bytes(message)
    assert payload_len == len(payload)
    assert frame_len == PREFIX_LEN + len(msgpack.packb(message.headers)) + len(payload)
    assert message_wire_bytes(_message("site-1", b""))[0] == 0


def test_site_is_the_first_name_of_the_origin_cell():
    assert site_of("site-1.3f2a-job") == "site-1"
    assert site_of("hospital_b") == "hospital_b"
    assert site_of(None) == "?"


def test_ledger_take_returns_bytes_since_the_previous_take_and_totals_keep_everything():
    ledger = ByteLedger()
    ledger.add("site-1", 100, 150)
    ledger.add("site-1", 10, 40)
    ledger.add("site-2", 7, 9)
    assert ledger.take("site-1") == {"messages": 2, "payload_bytes": 110, "frame_bytes": 190}
    assert ledger.take("site-1") == {"messages": 0, "payload_bytes": 0, "frame_bytes": 0}
    ledger.add("site-1", 5, 6)
    assert ledger.take("site-1")["payload_bytes"] == 5
    assert ledger.snapshot() == {
        "site-1": {"messages": 3, "payload_bytes": 115, "frame_bytes": 196},
        "site-2": {"messages": 1, "payload_bytes": 7, "frame_bytes": 9},
    }


def test_result_tensor_bytes_counts_the_adapter_tensors_of_a_result():
    assert result_tensor_bytes(_adapter_result(3)) == (3 * 4 * 8 * 4, 3)
    assert result_tensor_bytes(None) == (0, 0)


def test_meter_charges_each_result_with_its_sites_bytes_and_writes_the_record(tmp_path):
    meter = WireMeter(out_file=str(tmp_path / "meter.json"))
    meter._path = tmp_path / "meter.json"  # what START_RUN resolves from the run folder
    payload = fobs.dumps({"p": b"\0" * 1000})
    for _ in range(3):
        assert meter.on_incoming(_message("site-1.job", payload)) is None  # never stops a message
    meter.on_incoming(_message("site-2.job", payload))
    result = _adapter_result(2)
    meter.handle_event(EventType.AFTER_TASK_DATA_FILTER, FakeContext("site-1", "train"))
    meter.handle_event(EventType.BEFORE_TASK_RESULT_FILTER, FakeContext("site-1", "train", result))
    meter.handle_event(EventType.AFTER_TASK_RESULT_FILTER, FakeContext("site-1", "train", result))
    record = json.loads((tmp_path / "meter.json").read_text())
    (entry,) = record["results"]
    assert entry["site"] == "site-1" and entry["task"] == "train"
    assert entry["messages"] == 3 and entry["payload_bytes"] == 3 * len(payload)
    assert entry["frame_bytes"] > entry["payload_bytes"]
    assert entry["tensor_bytes_received"] == entry["tensor_bytes_restored"] == 2 * 4 * 8 * 4
    assert record["dispatches"][0]["site"] == "site-1" and record["dispatches"][0]["task"] == "train"
    assert record["totals"]["site-2"]["messages"] == 1  # site-2 has no result yet: nothing charged to it


@pytest.mark.slow
def test_simulator_run_measures_at_least_the_adapter_bytes_per_site_and_round(tmp_path, tiny_model_path):
    """A real FLARE run: the meter sees every adapter byte (tensors travel by download
    after the result message) and not much more."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from flare_bench import run_metered_simulation, tiny_spec, write_site_data

    sites = write_site_data(tmp_path / "data", 2)
    spec = tiny_spec("metered", sites, tmp_path / "data", rounds=2, local_steps=1)
    record = run_metered_simulation(spec, tmp_path / "run", sites, timeout=300)
    results = record.train_results()
    assert sorted(r["site"] for r in results) == ["site-1", "site-1", "site-2", "site-2"]
    raw = record.raw_tensor_bytes()
    assert raw > 100_000  # tiny Llama, r=8 on 7 projections, 2 layers: 131 kB in fp32
    for entry in results:
        assert raw <= entry["payload_bytes"] < 1.5 * raw
    assert record.startup_seconds() > 0 and record.server_peak_rss_bytes() > 0
    assert [r["round"] for r in record.rounds()] == [0, 1]
