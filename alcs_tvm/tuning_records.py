"""Tuning records: the fastest measured schedule of every conv of a model on one device (``alcs tune`` writes
them, ``alcs compile --tuning`` applies them).

Records are keyed by the conv's name (ONNX node name) and checked against the layer's shape, V and kernel layout
at compile time: a record that no longer fits (another model, another input size) is ignored and said so in the
report, never applied wrongly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .files import (TableMismatchError, check_header, check_measured_for, checked_number, json_copy, json_kind,
                    merge_entries, read_json_file, require_object, save_merged)
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

    # the layers as these records last read or wrote their file: what save() tells its own changes from others' by
    _saved: dict = field(default_factory=dict, repr=False, compare=False)

    def to_json(self) -> dict:
        return {"format": FORMAT, "target": self.target, "target_family": self.target_family,
                "device_key": self.device_key, "tvm_version": self.tvm_version, "settings": self.settings,
                "layers": self.layers}

    def save(self, path):
        """Add these records to the file at ``path``, atomically and under a lock: convs other runs recorded there
        since these records were loaded or last saved are kept (two ``alcs tune`` runs may share a file); convs
        recorded or re-tuned here are written. Afterwards the records hold what the file holds."""
        ours = json_copy(self.to_json())

        def merge(on_disk):
            theirs = json_copy(TuningRecords.from_json(on_disk, path).to_json())
            differ = [what for what, field_name in (("another target", "target"),
                                                    ("another TVM version", "tvm_version"),
                                                    ("another device", "device_key"))
                      if ours[field_name] != theirs[field_name]]
            if differ:
                raise TableMismatchError(f"{path} now holds tuning records measured for {', '.join(differ)} "
                                         f"(written by another run meanwhile): the two cannot share one file")
            return {**theirs, "layers": merge_entries(ours["layers"], self._saved, theirs["layers"])}

        written = save_merged(path, ours, merge, ".tuning-", "tuning records")
        self.layers.update(written["layers"])
        self._saved = written["layers"]

    @classmethod
    def load(cls, path) -> "TuningRecords":
        """The records at ``path``, every conv's record checked: a one-line ``ValueError`` naming the file and the
        conv for a missing field, a wrong type, or a time or density out of range."""
        return cls.from_json(read_json_file(path, "tuning records", FORMAT), path)

    @classmethod
    def from_json(cls, data: dict, path="(records)") -> "TuningRecords":
        where = ""
        try:
            check_header(data)
            require_object(data.get("settings", {}), "'settings'")
            require_object(data["layers"], "'layers' (conv name -> record)")
            for name, entry in data["layers"].items():
                where = f"conv {name!r}: "
                _check_record(entry)
        except ValueError as err:
            raise ValueError(f"tuning records {path} are corrupted: {where}{err}") from None
        records = cls(data["target"], data["target_family"], data.get("device_key"), data["tvm_version"],
                      dict(data.get("settings", {})), dict(data["layers"]))
        records._saved = json_copy(records.layers)
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


def _check_schedule(schedule, what):
    require_object(schedule, what)
    for knob in ("vector_width", "tile_rows", "tile_cols"):
        if knob not in schedule:
            raise ValueError(f"{what} lacks {knob}")
        checked_number(schedule[knob], f"{what}.{knob}", 1, integer=True)
    if not isinstance(schedule.get("row_outer"), bool):
        raise ValueError(f"{what}.row_outer must be true or false, got {schedule.get('row_outer')!r}")


def _check_record(entry):
    """One conv's record as :func:`alcs_tvm.autotune.tune_layer` writes it."""
    require_object(entry, "the record")
    missing = {"key", "layout", "schedule", "tuned_ms", "default_ms"} - set(entry)
    if missing:
        raise ValueError(f"lacks {', '.join(sorted(missing))}")
    if not isinstance(entry["key"], str):
        raise ValueError(f"key must be a string, got {json_kind(entry['key'])}")
    require_object(entry["layout"], "layout")
    try:
        KernelLayout.from_json(entry["layout"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"layout: {err}") from None
    _check_schedule(entry["schedule"], "schedule")
    if "default_schedule" in entry:
        _check_schedule(entry["default_schedule"], "default_schedule")
    for name in ("tuned_ms", "default_ms"):
        checked_number(entry[name], name)
    if "density" in entry:
        checked_number(entry["density"], "density", 0.0, 1.0)


def describe_schedule(schedule: SparseConvSchedule) -> str:
    return f"{schedule.tile_rows}x{schedule.tile_cols}" + (" row-outer" if schedule.row_outer else "")
