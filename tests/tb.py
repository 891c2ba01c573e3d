"""Reading TensorBoard event files back, for tests."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2


def load_run(run_dir: Path) -> EventAccumulator:
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def scalars(ea: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def hparams(ea: EventAccumulator) -> tuple[dict, list[str]]:
    """(hyperparameters of the session, metric tags declared for the HParams tab)."""
    content = ea.PluginTagToContent("hparams")
    params, metrics = {}, []
    for raw in content.values():
        data = plugin_data_pb2.HParamsPluginData.FromString(raw)
        if data.HasField("experiment"):
            metrics += [m.name.tag for m in data.experiment.metric_infos]
        if data.HasField("session_start_info"):
            for k, v in data.session_start_info.hparams.items():
                params[k] = v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
    return params, metrics


def hparams_view(ea: EventAccumulator) -> tuple[list[str], str, str]:
    """What the HParams tab shows of a run: the settings marked as differing (first, in order), the
    run's name (Trial ID) and its status at the end."""
    content = ea.PluginTagToContent("hparams")
    differs, name, status = [], "", "STATUS_UNKNOWN"
    for raw in content.values():
        data = plugin_data_pb2.HParamsPluginData.FromString(raw)
        if data.HasField("experiment"):
            differs = [h.name for h in data.experiment.hparam_infos if h.differs]
        if data.HasField("session_start_info"):
            name = data.session_start_info.group_name
        if data.HasField("session_end_info"):
            status = api_pb2.Status.Name(data.session_end_info.status)
    return differs, name, status


def texts(ea: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    out = []
    for e in ea.Tensors(tag):
        out.append((e.step, e.tensor_proto.string_val[0].decode()))
    return out
