"""The HParams plugin's records, written as TensorBoard reads them. torch's own `hparams()` writes
booleans as numbers (shown as 0.0000), makes a column of every setting and names no run, so the
protocol buffers are built here (the HParams plugin's own helpers need TensorFlow)."""

from __future__ import annotations

import time
from typing import Any

from google.protobuf import struct_pb2
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2


def _summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary:
    data.version = metadata.PLUGIN_DATA_VERSION
    meta = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString())
    )
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])


def _value(v: Any) -> tuple[struct_pb2.Value, int]:
    if isinstance(v, bool):  # before int: a bool is an int to Python
        return struct_pb2.Value(bool_value=v), api_pb2.DATA_TYPE_BOOL
    if isinstance(v, int):  # the tab prints every number to five digits (32.000): an integer as its digits
        return struct_pb2.Value(string_value=str(v)), api_pb2.DATA_TYPE_STRING
    if isinstance(v, float):
        return struct_pb2.Value(number_value=v), api_pb2.DATA_TYPE_FLOAT64
    return struct_pb2.Value(string_value="null" if v is None else str(v)), api_pb2.DATA_TYPE_STRING


def hparams_start(
    params: dict[str, Any], differing: list[str], metrics: tuple[tuple[str, str], ...], name: str = ""
) -> list[Summary]:
    """The experiment (a column for each of the `differing` settings, marked so, then the metric
    columns) and this run's session start (the values of all its settings, so that another run's
    columns find them, and its name in the table)."""
    start = plugin_data_pb2.HParamsPluginData()
    start.session_start_info.group_name = name
    start.session_start_info.start_time_secs = time.time()
    infos = []
    for key in differing + sorted(k for k in params if k not in differing):
        value, kind = _value(params[key])
        start.session_start_info.hparams[key].CopyFrom(value)
        if key in differing:
            infos.append(api_pb2.HParamInfo(name=key, type=kind, differs=True))
    experiment = plugin_data_pb2.HParamsPluginData(
        experiment=api_pb2.Experiment(
            hparam_infos=infos,
            metric_infos=[
                api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=shown) for tag, shown in metrics
            ],
        )
    )
    return [_summary(metadata.EXPERIMENT_TAG, experiment), _summary(metadata.SESSION_START_INFO_TAG, start)]


def hparams_end(status: str) -> Summary:
    """The session's end: STATUS_SUCCESS or STATUS_FAILURE."""
    end = plugin_data_pb2.HParamsPluginData()
    end.session_end_info.status = api_pb2.Status.Value(status)
    end.session_end_info.end_time_secs = time.time()
    return _summary(metadata.SESSION_END_INFO_TAG, end)
