"""Tuning records: the fastest measured schedule of every conv of a model on one device (``alcs tune`` writes
them, ``alcs compile --tuning`` applies them).

Records are keyed by the conv's name (ONNX node name) and checked against the layer's shape, V and kernel layout
at compile time: a record that no longer fits (another model, another input size) is ignored and said so in the
report, never applied wrongly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .files import check_measured_for, read_json_file, write_json_atomic
from .layer import KernelLayout
from .schedules import SparseConvSchedule

__all__ = ["TuningRecords", "FORMAT"]

FORMAT = "alcs-tvm-tuning/1"


@dataclass
class TuningRecords:
    """The fastest measured schedule per conv of a model, on one device."""

    target: dict
    target_family: str
    device_key: str | None
    tvm_version: str
    settings: dict = field(default_factory=dict)
    layers: dict = field(default_factory=dict)  # conv name -> {"key", "layout", "density", "schedule", "tuned_ms", ..}

    def save(self, path):
        write_json_atomic(path, {"format": FORMAT, **asdict(self)}, prefix=".tuning-")

    @classmethod
    def load(cls, path) -> "TuningRecords":
        data = read_json_file(path, "tuning records", FORMAT)
        try:
            records = cls(data["target"], data["target_family"], data.get("device_key"), data["tvm_version"],
                          dict(data.get("settings", {})), dict(data["layers"]))
            for name, entry in records.layers.items():
                missing = {"key", "layout", "schedule", "tuned_ms", "default_ms"} - set(entry)
                if missing:
                    raise KeyError(f"conv {name!r} lacks {', '.join(sorted(missing))}")
                cls.schedule_of(entry)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"tuning records {path} are corrupted: {err}") from None
        return records

    def check_compatible(self, target_info, tvm_version: str):
        """Raise :class:`TableMismatchError` when the records were measured for another target or TVM."""
        check_measured_for("tuning records", self.target, self.target_family, self.tvm_version, target_info,
                           tvm_version, "tune this target and TVM with `alcs tune`")

    @staticmethod
    def schedule_of(entry) -> SparseConvSchedule:
        s = entry["schedule"]
        return SparseConvSchedule(int(s["vector_width"]), int(s["tile_rows"]), int(s["tile_cols"]),
                                  bool(s["row_outer"]))

    def schedule_for(self, name: str, key: str, layout: KernelLayout):
        """``(schedule or None, why)``: the record of conv ``name`` if it was tuned with this shape, V and layout."""
        entry = self.layers.get(name)
        if entry is None:
            return None, "no tuning record"
        if entry["key"] != key or entry["layout"] != layout.to_json():
            return None, "tuning record is for another shape or layout"
        return self.schedule_of(entry), None


def describe_schedule(schedule: SparseConvSchedule) -> str:
    return f"{schedule.tile_rows}x{schedule.tile_cols}" + (" row-outer" if schedule.row_outer else "")
