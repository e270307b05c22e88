"""Finishing passes: provenance in metadata_props and an IR version the installed runtime loads."""

from __future__ import annotations

import onnx_ir as ir


class RecordProvenancePass(ir.passes.InPlacePass):
    """Write qtc's provenance keys into the model's metadata_props (sorted, no timestamps: same bytes out)."""

    def __init__(self, properties: dict[str, str]) -> None:
        super().__init__()
        self.properties = properties

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for key in sorted(self.properties):
            model.metadata_props[key] = self.properties[key]
        return ir.passes.PassResult(model, modified=bool(self.properties))


class LimitIrVersionPass(ir.passes.InPlacePass):
    """Lower the IR version to what the runtime reads; qtc emits nothing that needs a newer one."""

    def __init__(self, max_version: int) -> None:
        super().__init__()
        self.max_version = max_version

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if model.ir_version <= self.max_version:
            return ir.passes.PassResult(model, modified=False)
        model.ir_version = self.max_version
        return ir.passes.PassResult(model, modified=True)
